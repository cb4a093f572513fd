"""Scale-out through accelerate: the launcher logic, the shipped configs, and a real two-process DDP
run of the SFT stage on CPU (gloo), compared with a single-process run of the same stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.projects import TRAINING, make_project
from helpers.tiny import REPO, tiny_raw

from posttrain import runtime
from posttrain.config import ComputeConfig, parse_params
from posttrain.errors import ParamsError
from posttrain.lineage import verify_model_folder
from posttrain.models.loading import load_stage_model
from posttrain.pipeline import launch
from posttrain.runtime import setup_runtime
from posttrain.training.checkpoints import COMPLETE_MARKER
from posttrain.training.trl_config import trl_config

CONFIGS = REPO / "configs" / "accelerate"


# --------------------------------------------------------------------------- launcher logic


def test_inside_launcher_and_ranks_from_the_environment():
    assert not launch.inside_launcher({})
    assert launch.inside_launcher({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"})  # torchrun
    assert launch.inside_launcher({"ACCELERATE_MIXED_PRECISION": "no"})  # accelerate, one process
    assert launch.inside_launcher({launch.LAUNCHED_ENV: "1"})
    assert runtime.process_rank({"RANK": "3", "LOCAL_RANK": "1"}) == 3  # the global rank decides
    assert not runtime.is_main_process({"RANK": "1"}) and runtime.is_main_process({})
    assert runtime.world_size({"WORLD_SIZE": "16"}) == 16 and runtime.world_size({}) == 1


def test_only_trainer_stages_relaunch_and_only_once():
    accel = ComputeConfig(launcher="accelerate", accelerate_config="configs/accelerate/fsdp.yaml")
    assert launch.should_relaunch("sft", accel, env={})
    assert launch.should_relaunch("grpo", accel, env={})
    assert not launch.should_relaunch("evaluate", accel, env={})  # not a trainer stage
    assert not launch.should_relaunch("sft", accel, env={"RANK": "0", "WORLD_SIZE": "2"})  # already launched
    assert not launch.should_relaunch("sft", ComputeConfig(), env={})


def test_accelerate_command_runs_the_same_stage_module(tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text("distributed_type: MULTI_GPU\n")
    accel = ComputeConfig(launcher="accelerate", accelerate_config="ddp.yaml")
    resolved = launch.resolve_accelerate_config(accel, tmp_path)
    assert resolved == config
    cmd = launch.accelerate_command("sft", resolved, ["--params", "/p/params.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[3:] == ["--config_file", str(config), "-m", "stages.sft", "--params", "/p/params.yaml"]


def test_missing_accelerate_config_names_the_key(tmp_path):
    accel = ComputeConfig(launcher="accelerate", accelerate_config="configs/accelerate/nope.yaml")
    with pytest.raises(ParamsError, match=r"compute\.accelerate_config: got 'configs/accelerate/nope.yaml'"):
        launch.resolve_accelerate_config(accel, tmp_path)


@pytest.mark.parametrize(
    ("name", "kind", "processes"),
    [
        ("single_gpu.yaml", "NO", 1),
        ("multi_gpu_ddp.yaml", "MULTI_GPU", 8),
        ("fsdp.yaml", "FSDP", 4),
        ("deepspeed_zero2.yaml", "DEEPSPEED", 8),
        ("deepspeed_zero3.yaml", "DEEPSPEED", 8),
        ("cpu_ddp.yaml", "MULTI_GPU", 2),
        ("multi_node_ddp.yaml", "MULTI_GPU", 16),
    ],
)
def test_shipped_accelerate_configs_load_with_accelerate(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == kind and config.num_processes == processes
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # rank 0 writes a full folder
    if name == "deepspeed_zero3.yaml":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]
    if name == "multi_node_ddp.yaml":
        assert config.num_machines == 2 and config.main_process_ip and config.machine_rank == 0


def test_grpo_engine_sets_trl_s_generation_switches(tmp_path):
    """The engine chosen in grpo.generation reaches TRL's GRPOConfig as its own switches; vLLM is refused
    by name on this CPU machine (no CUDA, not installed) instead of silently falling back."""
    from trl import GRPOConfig

    from posttrain.scoring.engines import stage_engine
    from posttrain.training.trl_config import engine_fields

    runtime = setup_runtime(ComputeConfig(device="cpu", num_threads=1), seed=0)
    params = parse_params(tiny_raw(TRAINING, grpo={"generation": {"engine": "paged"}}))
    engine, options = stage_engine(params, "grpo", runtime.device)
    cache = {"num_blocks": 8, "page_size": 32}
    config = trl_config(GRPOConfig, "grpo", params.grpo, runtime, tmp_path, **engine_fields(engine, options, cache))
    assert config.use_transformers_continuous_batching is True and config.use_vllm is False
    assert config.transformers_continuous_batching_config == cache
    hf = trl_config(GRPOConfig, "grpo", parse_params(tiny_raw(TRAINING)).grpo, runtime, tmp_path)
    assert hf.use_transformers_continuous_batching is False and hf.use_vllm is False  # TRL's generate
    with pytest.raises(ParamsError, match="grpo.generation.engine: engine 'vllm' is not available"):
        stage_engine(parse_params(tiny_raw(TRAINING, grpo={"generation": {"engine": "vllm"}})), "grpo", "cpu")


# --------------------------------------------------------------------------- a real DDP run


def _stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", launch.LAUNCHED_ENV):
        env.pop(name, None)
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.slow
def test_two_process_cpu_ddp_sft_writes_the_same_model_folder_and_lineage(tmp_path):
    import stages.cpt
    import stages.pretrain
    import stages.sft

    raw = tiny_raw(TRAINING)
    raw["compute"]["num_threads"] = 1
    for stage in ("pretrain", "cpt", "sft"):
        raw[stage]["eval_every"] = 0
        raw[stage]["eval_items"] = 4
    params, layout = make_project(tmp_path / "project", raw)
    stages.pretrain.run(params, layout)
    stages.cpt.run(params, layout)

    # 1. The reference: the sft stage in one process.
    stages.sft.run(params, layout)
    single = verify_model_folder(layout.model("sft"))
    single_files = sorted(p.name for p in layout.model("sft").iterdir())

    # 2. The same stage, same dvc.yaml command, with compute.launcher: accelerate -> 2 processes (gloo).
    raw["compute"].update(launcher="accelerate", accelerate_config=str(CONFIGS / "cpu_ddp.yaml"))
    (layout.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stages.sft", "--root", str(layout.root)],
        cwd=layout.root, env=_stage_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-6000:]
    print(f"two-process DDP sft stage: {seconds:.1f} s")

    ddp = verify_model_folder(layout.model("sft"))
    assert sorted(p.name for p in layout.model("sft").iterdir()) == single_files
    load_stage_model(layout.model("sft"))  # a valid model folder: hashes, tokenizer and model fit
    # The same lineage record: same fields, same parents, data and params; only the run differs.
    assert ddp.keys() == single.keys()
    assert ddp["parents"] == single["parents"]
    for key in ("stage", "data_manifest_hash", "params_hash", "params", "seed", "versions"):
        assert ddp[key] == single[key], key
    assert single["distributed"] == {"world_size": 1, "type": "NO"}
    assert ddp["distributed"] == {"world_size": 2, "type": "MULTI_CPU"}
    assert ddp["checkpoints"] != single["checkpoints"]  # 2 processes = another global batch, not resumed
    metrics = json.loads(layout.metrics("sft").read_text())
    assert metrics["steps"] == 6 and metrics["steps_this_run"] == 6 and metrics["world_size"] == 2

    # Both ranks trained and saved their part of every checkpoint; rank 0 alone marked it complete
    # and wrote the outputs (nothing half-renamed left behind by a second writer).
    ckpts = layout.root / ddp["checkpoints"]
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    for ckpt in ckpts.glob("checkpoint-*"):
        assert (ckpt / COMPLETE_MARKER).is_file()
        assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert not [p.name for p in layout.model("sft").parent.iterdir() if p.name.startswith(".")]
    assert "launching through accelerate" in done.stderr


def test_launched_exit_status_restores_a_ranks_not_retryable_status(tmp_path):
    status = tmp_path / "status"
    assert launch.launched_exit_status(0, status) == 0
    assert launch.launched_exit_status(1, status) == 1  # no rank reported: the launcher's own status
    launch.report_exit_status(1, env={launch.EXIT_STATUS_ENV: str(status)})
    launch.report_exit_status(3, env={launch.EXIT_STATUS_ENV: str(status)})
    assert launch.launched_exit_status(1, status) == 3
    launch.report_exit_status(3, env={})  # outside a launch: nothing to write, no error


@pytest.mark.slow
def test_out_of_memory_on_launched_ranks_exits_3_through_accelerate(tmp_path):
    """`accelerate launch` reports a failed rank as 1; the stage's "do not retry" status 3 must survive.

    Real `accelerate launch` of two CPU ranks through the real stage entry; the stage function itself
    raises MemoryError on every rank (what the allocator raises when memory runs out).
    """
    raw = tiny_raw(TRAINING)
    raw["compute"].update(launcher="accelerate", accelerate_config=str(CONFIGS / "cpu_ddp.yaml"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "sft.py").write_text(
        "from posttrain.pipeline.entry import stage_main\n\n"
        "def run(params, layout):\n"
        "    raise MemoryError('cannot allocate 17179869184 bytes')\n\n"
        "if __name__ == '__main__':\n"
        "    stage_main('sft', run)\n"
    )
    env = _stage_env()
    env["PYTHONPATH"] = os.pathsep.join((str(tmp_path), str(REPO)))  # this stages/ first, then posttrain
    done = subprocess.run(
        [sys.executable, "-m", "stages.sft", "--root", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "launching through accelerate" in done.stderr
    assert "out of memory" in done.stderr, done.stderr[-4000:]
    assert done.returncode == 3, done.stderr[-4000:]


# --------------------------------------------------------------------------- the real-scale recipe


def test_qwen_recipe_validates_and_its_trainer_keys_are_known_to_trl(tmp_path):
    from trl import DPOConfig, GRPOConfig, SFTConfig

    from posttrain.config import load_params

    params = load_params(REPO / "configs" / "qwen2.5-0.5b.yaml")
    assert params.model.base == "Qwen/Qwen2.5-0.5B"
    assert {d.kind for d in params.data.domains.values()} == {"hub"}
    assert params.compute.launcher == "accelerate" and (REPO / params.compute.accelerate_config).is_file()
    runtime = setup_runtime(ComputeConfig(device="cpu", num_threads=1), seed=0)
    # Every pass-through key is a real TRL field (a typo would only surface on the GPU cluster).
    for stage, config_cls in (("cpt", SFTConfig), ("sft", SFTConfig), ("dpo", DPOConfig), ("grpo", GRPOConfig)):
        trl_config(config_cls, stage, params.stage_section(stage), runtime, tmp_path / stage)
