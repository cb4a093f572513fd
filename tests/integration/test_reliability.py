"""Reliability, bad input and security: real faults injected into real processes and files.

Faults are real: memory and file-size limits are lowered on a running stage with prlimit (the
kernel then refuses its allocations / writes, as a full machine or disk would), sockets are really
closed, SQLite is really locked, generated code really runs. See the README's reliability table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.toy_dvc import make_toy_project, toy_env
from helpers.projects import TRAINING, make_project
from helpers.tiny import REPO, tiny_raw

from posttrain.config import parse_params
from posttrain.errors import DataError, StageError
from posttrain.lineage import file_hashes
from posttrain.scoring import rewards
from posttrain.training.inputs import check_lengths

SECRET = "hf_S3CRETvalue0123456789"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return env | extra


def _stage(root: Path, stage: str = "pretrain", **popen: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", f"stages.{stage}", "--root", str(root)],
        cwd=REPO, env=popen.pop("env", _env()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def _vm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def _wait_line(proc: subprocess.Popen, needle: str, seen: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} never printed:\n{''.join(seen)[-3000:]}")


# --------------------------------------------------------------------------- sandboxed code reward


def test_python_output_reward_scores_a_correct_snippet() -> None:
    assert rewards.python_output(["print(6 * 7)", "print(41)", "print(1/0)"], ["42", "42", "42"]) == [1.0, 0.0, 0.0]
    assert "python_output" in rewards.known_rewards()


def test_python_output_infinite_loop_is_killed_by_limits() -> None:
    started = time.perf_counter()
    status, out = rewards.run_snippet("while True:\n    pass")
    elapsed = time.perf_counter() - started
    assert status != 0 and out == ""  # SIGXCPU/SIGKILL from RLIMIT_CPU, or None from the wall timeout
    assert elapsed < rewards.CODE_WALL_SECONDS + 3
    # A sleeping snippet uses no CPU: the wall timeout kills it (and its process group).
    status, _ = rewards.run_snippet("import time\ntime.sleep(60)", timeout=1.0)
    assert status is None


def test_python_output_memory_bomb_is_limited() -> None:
    status, out = rewards.run_snippet("x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert status != 0 and "allocated" not in out  # MemoryError under RLIMIT_AS
    status, out = rewards.run_snippet("open('big', 'wb').write(b'0' * 50_000_000)\nprint('wrote')")
    assert status != 0 and "wrote" not in out  # RLIMIT_FSIZE


def test_python_output_cannot_read_the_trainers_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("PYTHONPATH", "/should/not/matter")
    status, out = rewards.run_snippet("import os\nprint(os.environ.get('HF_TOKEN'), sorted(os.environ))")
    assert status == 0 and SECRET not in out and out.startswith("None")
    assert rewards.python_output(["import os; print(os.environ.get('HF_TOKEN'))"], [SECRET]) == [0.0]


# --------------------------------------------------------------------------- bad input


def test_too_long_prompt_truncate_path_is_reported_and_refuse_path_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from posttrain.models.build import train_tokenizer

    params, layout = make_project(tmp_path)
    tok = train_tokenizer(["12+34=46", "rev:abc=cba"], params.model.tokenizer)
    texts, ids = ["12+34=46", "1" * 40], ["ok", "long"]
    with pytest.raises(
        DataError, match=r"where: 1 example\(s\) longer than max_length=24 .*'long'.*on_too_long: truncate"
    ):
        check_lengths(texts, ids, tok, 24, "refuse", "where")
    with caplog.at_level(logging.WARNING, logger="posttrain.training"):
        assert check_lengths(texts, ids, tok, 24, "truncate", "where") == 1
    assert "where: 1 example(s) longer than 24 tokens are truncated" in caplog.text


def test_tokenizer_that_does_not_match_the_model_is_refused_at_load(tmp_path: Path) -> None:
    """A stage folder whose tokenizer was swapped for a bigger one (hashes re-recorded, so only the fit check can catch it)."""
    from posttrain.lineage import write_lineage
    from posttrain.models.build import build_scratch_model, save_model, train_tokenizer
    from posttrain.models.loading import load_stage_model

    params = parse_params(tiny_raw(TRAINING))
    small = train_tokenizer(["12+34=46"] * 5, params.model.tokenizer)
    big = train_tokenizer([f"{w}{i}" for i in range(50) for w in ("abc", "xyz", "qrs")], params.model.tokenizer)
    assert len(big) > len(small)
    folder = tmp_path / "m"
    save_model(build_scratch_model(params.model.architecture, small), small, folder)
    big.save_pretrained(folder)
    write_lineage(folder, stage="cpt", root=tmp_path, parents=[], params={}, params_hash="x", seed=0)
    with pytest.raises(
        StageError, match=rf"tokenizer has {len(big)} tokens but the model's embedding matrix has {len(small)} rows"
    ):
        load_stage_model(folder)


# --------------------------------------------------------------------------- NaN loss + secrets, through real processes


@pytest.mark.slow
def test_nan_stage_writes_and_registers_nothing_and_secrets_stay_out(tmp_path: Path) -> None:
    """A tracked stage run with a secret in params and env; then a diverging rerun (NaN loss)."""
    raw = tiny_raw(TRAINING, pretrain={"trainer": {"max_steps": 2, "save_steps": 2, "hub_token": SECRET}})
    raw["tracking"]["enabled"] = True
    raw["compute"]["num_threads"] = 1
    _, layout = make_project(tmp_path / "p", raw)
    env = _env(HF_TOKEN=SECRET, MLFLOW_DISABLE_TELEMETRY="true")
    out = _finish(_stage(layout.root, env=env))
    assert "stage pretrain: finished" in out, out[-3000:]
    good = file_hashes(layout.model("pretrain"))
    # The secret reached the run (TRL's config got it) but no log line, lineage record or MLflow param.
    assert SECRET not in out
    lineage_text = (layout.model("pretrain") / "lineage.json").read_text()
    assert SECRET not in lineage_text and '"hub_token": "***"' in lineage_text
    from mlflow import MlflowClient

    uri = f"sqlite:///{layout.root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)  # registry too: MLflow's global registry URI may point at another test's store
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(SECRET not in json.dumps([r.data.params, r.data.tags]) for r in runs)
    versions = client.search_model_versions()
    assert len(versions) == 1

    raw["pretrain"]["trainer"].update(learning_rate=1e30, max_grad_norm=1e30)
    (layout.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _stage(layout.root, env=env)
    out = _finish(proc)
    assert proc.returncode == 1, out[-3000:]
    assert "error: stage pretrain:" in out and "no model written" in out
    assert re.search(r"NaN/inf|is (nan|inf) at step", out), out[-3000:]  # the weights' check or the loss's
    assert file_hashes(layout.model("pretrain")) == good  # previous model untouched
    assert not list(layout.model("pretrain").parent.glob(".pretrain.*"))
    assert len(client.search_model_versions()) == 1  # nothing registered
    runs_after = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.run_id for r in runs_after if r.info.run_name == "pretrain"} == {
        r.info.run_id for r in runs if r.info.run_name == "pretrain"
    }  # no MLflow run recorded for the failed stage


# --------------------------------------------------------------------------- out of memory


@pytest.mark.slow
def test_out_of_memory_is_a_clear_non_retryable_error(tmp_path: Path) -> None:
    """A ~75M-parameter model whose address space is capped (prlimit) once training is about to start:
    the gradients/optimizer state cannot be allocated, as on a full machine."""
    raw = tiny_raw(TRAINING, pretrain={"trainer": {"max_steps": 3, "save_steps": 100}, "eval_items": 2})
    raw["model"]["architecture"].update(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12
    )
    raw["compute"]["num_threads"] = 1
    _, layout = make_project(tmp_path / "p", raw)
    proc = _stage(layout.root)
    seen: list[str] = []
    _wait_line(proc, "training examples, checkpoints in", seen)
    # Room for evaluation and activations, not for a second copy of the weights (gradients).
    limit = _vm_bytes(proc.pid) + 150 * 2**20
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    out = "".join(seen) + _finish(proc)
    assert proc.returncode == 3, out[-3000:]
    error = out[out.rindex("error: stage pretrain:") :]
    assert "out of memory" in error and "not retried" in error
    assert "per_device_train_batch_size" in error and "gradient_checkpointing" in error and "LoRA" in error
    assert "Traceback" not in out
    assert not layout.model("pretrain").exists()


def test_flow_retry_condition_skips_non_retryable_failures() -> None:
    from prefect.states import Failed

    from flows.pipeline import StageFailed, _should_retry

    def failed(code: int) -> Any:
        tail = [
            "error: stage sft: x",
            f"ERROR: failed to reproduce 'sft': failed to run: python -m stages.sft, exited with {code}",
        ]
        error = StageFailed("sft", 255, tail)
        return Failed(data=error, message=str(error))

    assert _should_retry(None, None, failed(1)) is True  # e.g. preempted: the retry resumes
    assert _should_retry(None, None, failed(3)) is False  # out of memory / disk: same result again
    assert _should_retry(None, None, Failed(data=RuntimeError("bug"))) is True


# --------------------------------------------------------------------------- disk full


@pytest.mark.slow
def test_disk_full_while_checkpointing_leaves_it_unmarked_and_resume_uses_the_previous(tmp_path: Path) -> None:
    raw = tiny_raw(
        TRAINING, pretrain={"trainer": {"max_steps": 120, "save_steps": 20, "logging_steps": 20}, "eval_every": 0}
    )
    raw["compute"]["num_threads"] = 1
    _, layout = make_project(tmp_path / "p", raw)
    # SIGXFSZ ignored (inherited through exec): an oversized write fails with EFBIG instead of killing.
    proc = _stage(layout.root, preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    deadline = time.time() + 240
    while not (found := list((layout.root / "checkpoints").glob("pretrain-*/checkpoint-20/COMPLETE"))):
        assert proc.poll() is None and time.time() < deadline, "no complete checkpoint before the stage ended"
        time.sleep(0.02)
    first = found[0].parent
    model_size = (first / "model.safetensors").stat().st_size
    optimizer_size = (first / "optimizer.pt").stat().st_size
    assert optimizer_size > model_size
    # The "disk" now holds files up to between the two sizes: the next checkpoint's optimizer state fails.
    limit = (model_size + optimizer_size) // 2
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    out = _finish(proc)
    assert proc.returncode == 3, out[-3000:]
    assert "disk full or file size limit reached" in out and "Traceback" not in out
    assert not layout.model("pretrain").exists()
    checkpoints = sorted(first.parent.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in checkpoints if (p / "COMPLETE").is_file()]
    broken = [p for p in checkpoints if not (p / "COMPLETE").is_file()]
    assert complete and broken and int(broken[-1].name.split("-")[1]) > int(complete[-1].name.split("-")[1])

    out = _finish(_stage(layout.root))
    newest = complete[-1]
    assert f"resuming from {newest} (step {newest.name.split('-')[1]})" in out, out[-3000:]
    assert f"checkpoint {broken[-1]} has no COMPLETE marker" in out
    metrics = json.loads(layout.metrics("pretrain").read_text())
    assert metrics["steps"] == 120 and metrics["resumed_from_step"] == int(newest.name.split("-")[1])


@pytest.mark.slow
def test_disk_full_while_saving_the_model_keeps_the_previous_model(tmp_path: Path) -> None:
    """pretrain with a given base only re-saves it: the model write itself hits the file-size limit."""
    from posttrain.models.build import build_scratch_model, save_model, train_tokenizer

    raw = tiny_raw(TRAINING)
    params = parse_params(raw)
    tok = train_tokenizer(["12+34=46", "rev:abc=cba"] * 5, params.model.tokenizer)
    bases = []
    for seed in (1, 2):
        import torch

        torch.manual_seed(seed)
        bases.append(tmp_path / f"base{seed}")
        save_model(build_scratch_model(params.model.architecture, tok), tok, bases[-1])
    raw["model"]["base"] = str(bases[0])
    _, layout = make_project(tmp_path / "p", raw)
    out = _finish(_stage(layout.root))
    assert "stage pretrain: finished" in out, out[-3000:]
    good = file_hashes(layout.model("pretrain"))

    raw["model"]["base"] = str(bases[1])  # a different model: an overwrite would change the hashes
    (layout.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    limit = (bases[1] / "model.safetensors").stat().st_size // 2

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _stage(layout.root, preexec_fn=small_disk)
    out = _finish(proc)
    assert proc.returncode == 3, out[-3000:]
    assert "error: stage pretrain: disk full or file size limit reached" in out and "Traceback" not in out
    assert file_hashes(layout.model("pretrain")) == good
    assert not list(layout.model("pretrain").parent.glob(".pretrain.*"))


# --------------------------------------------------------------------------- services and concurrency


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed once the with block ends


def test_unreachable_prefect_api_fails_fast_before_any_stage(tmp_path: Path) -> None:
    toy = make_toy_project(tmp_path / "toy")
    url = f"http://user:pa55word@127.0.0.1:{_closed_port()}/api"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "posttrain.pipeline.cli", "run", "--root", str(toy)],
        cwd=REPO, env=toy_env() | {"PREFECT_API_URL": url}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert done.returncode == 1
    assert "Prefect API http://user:***@127.0.0.1" in done.stderr and "cannot be reached" in done.stderr
    assert "pa55word" not in done.stderr + done.stdout
    assert elapsed < 30, elapsed
    assert not (toy / "out").exists() and not (toy / "dvc.lock").exists()


def test_two_runs_in_one_workspace_wait_or_refuse_and_leave_a_valid_dvc_lock(tmp_path: Path) -> None:
    toy = make_toy_project(tmp_path / "toy")
    cmd = [sys.executable, "-m", "posttrain.pipeline.cli", "run", "--no-prefect", "--root", str(toy)]
    kw: dict[str, Any] = {
        "cwd": REPO,
        "env": toy_env(),
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "text": True,
    }
    from posttrain.pipeline.workspace import pipeline_lock

    # A run that holds the workspace: the CLI's --no-prefect path must refuse, naming the holder.
    with pipeline_lock(toy):
        refused = subprocess.run(
            [*cmd, "--wait", "1"],
            timeout=120,
            **{k: v for k, v in kw.items() if k not in ("stdout", "stderr")},
            capture_output=True,
        )
    assert refused.returncode == 1
    assert f"another pipeline run holds {toy} (pid {os.getpid()}" in refused.stderr
    assert not (toy / "out").exists() and not (toy / "dvc.lock").exists()

    # Two real runs started together: the second waits for the first, then finds everything up to date.
    first, second = subprocess.Popen([*cmd, "--wait", "120"], **kw), subprocess.Popen([*cmd, "--wait", "120"], **kw)
    outs = [p.communicate(timeout=240) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    ran = [out.count("Running stage") for out, _ in outs]
    assert sorted(ran) == [0, 4], outs  # one ran every stage, the other none: never interleaved
    status = subprocess.run(["dvc", "status", "--json"], cwd=toy, env=toy_env(), capture_output=True, text=True)
    assert json.loads(status.stdout) == {}, status.stdout  # dvc.lock consistent with the outputs


def test_prefect_treats_sqlite_database_is_locked_as_retryable(tmp_path: Path) -> None:
    """A really locked SQLite database: Prefect's server maps the error to a client retry (HTTP 503)."""
    import sqlalchemy
    from prefect.server.api.server import is_client_retryable_exception

    db = tmp_path / "prefect.db"
    holder = sqlite3.connect(db)
    holder.execute("create table t (x)")
    holder.execute("begin exclusive")
    engine = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0.1})
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError, match="database is locked") as info:
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text("insert into t values (1)"))
        assert is_client_retryable_exception(info.value)
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()


# --------------------------------------------------------------------------- stage boundaries


def test_evaluate_refuses_models_whose_tokenizers_differ(tmp_path: Path) -> None:
    import stages.evaluate
    from posttrain.models.build import build_scratch_model, save_model, train_tokenizer

    raw = tiny_raw(TRAINING)
    raw["evaluate"].update(
        models=["pretrain", "cpt"], max_items=4, pass_at_k={"n": 2, "k": [1], "temperature": 0.8, "max_items": 2}
    )
    params, layout = make_project(tmp_path / "p", raw)
    tok = train_tokenizer(["12+34=46", "rev:abc=cba"] * 5, params.model.tokenizer)
    save_model(build_scratch_model(params.model.architecture, tok), tok, layout.model("pretrain"))
    drifted = train_tokenizer(["12+34=46", "rev:abc=cba"] * 5, params.model.tokenizer)
    drifted.add_special_tokens({"eos_token": "<|end|>"})  # EOS drift: a common silent failure
    model = build_scratch_model(params.model.architecture, drifted)
    save_model(model, drifted, layout.model("cpt"))
    with pytest.raises(StageError) as info:
        stages.evaluate.run(params, layout)
    message = str(info.value)
    assert str(layout.model("cpt")) in message and str(layout.model("pretrain")) in message
    assert "eos: ['</s>', 1] vs ['<|end|>', " in message


# --------------------------------------------------------------------------- security


def test_pickle_only_model_folder_is_refused(tmp_path: Path) -> None:
    from posttrain.config import ModelConfig
    from posttrain.models.build import build_scratch_model, load_base, train_tokenizer
    from posttrain.models.loading import load_stage_model

    params = parse_params(tiny_raw(TRAINING))
    tok = train_tokenizer(["12+34=46"] * 5, params.model.tokenizer)
    folder = tmp_path / "pickled"
    import torch

    model = build_scratch_model(params.model.architecture, tok)
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a pickle checkpoint, as older repos ship
    tok.save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    with pytest.raises(StageError, match="pickle weights such as pytorch_model.bin are refused"):
        load_stage_model(folder)
    with pytest.raises(StageError, match="model.safetensors"):
        load_base(ModelConfig(base=str(folder)))


def test_remote_code_is_not_run_unless_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model folder that ships its own modelling code: loading it must not import that code."""
    from posttrain.config import ModelConfig
    from posttrain.models.build import build_scratch_model, load_base, train_tokenizer

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert ModelConfig().trust_remote_code is False
    params = parse_params(tiny_raw(TRAINING))
    tok = train_tokenizer(["12+34=46"] * 5, params.model.tokenizer)
    folder = tmp_path / "custom"
    build_scratch_model(params.model.architecture, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    # The hub-style custom code is ignored (the folder still loads as plain Llama) or refused; never run.
    try:
        load_base(ModelConfig(base=str(folder)))
    except StageError:
        pass
    assert not marker.exists()


def test_servers_the_project_starts_bind_localhost() -> None:
    """Prefect's ephemeral server (`posttrain run`) and its runner webserver (`deploy --serve`) listen on
    loopback by default, and nothing in the project or its env script widens that."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    assert str(settings.server.api.host) == "127.0.0.1"
    assert str(settings.runner.server.host) in ("127.0.0.1", "localhost")
    sources = [
        *REPO.joinpath("posttrain").rglob("*.py"),
        *REPO.joinpath("flows").rglob("*.py"),
        REPO / "scripts" / "env.sh",
        REPO / "run.sh",
    ]
    for path in sources:
        text = path.read_text()
        assert "0.0.0.0" not in text and "PREFECT_SERVER_API_HOST" not in text, path
