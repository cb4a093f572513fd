"""Merge methods against hand-computed tensors, and whole-model merging on tiny saved models."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from helpers.tiny import char_tokenizer, save_tiny, tiny_model

from posttrain.errors import StageError
from posttrain.models import merging

T = torch.tensor


def close(a: torch.Tensor, b, atol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol)


# --------------------------------------------------------------------------- per-tensor methods


def test_linear_weighted_average():
    out = merging.merge_tensor("linear", [T([1.0, 2.0]), T([3.0, 6.0])], weights=[1, 3])
    # (1*1 + 3*3)/4, (1*2 + 3*6)/4
    assert close(out, [2.5, 5.0])


def test_task_arithmetic():
    base = T([1.0, 1.0, 1.0])
    out = merging.merge_tensor(
        "task_arithmetic", [T([2.0, 1.0, 0.0]), T([1.0, 3.0, 1.0])], weights=[1.0, 0.5], base=base
    )
    # deltas (1,0,-1) and (0,2,0); 1*(1,0,-1) + 0.5*(0,2,0) = (1,1,-1); plus base
    assert close(out, [2.0, 2.0, 0.0])


def test_ties_prunes_elects_sign_by_mass_and_averages_agreeing():
    base = T([1.0, 1.0, 1.0, 1.0])
    deltas = [T([3.0, -1.0, 2.0, -0.5]), T([-2.0, -4.0, 1.0, 0.2]), T([1.5, -1.0, -3.0, 0.1])]
    out = merging.merge_tensor("ties", [base + d for d in deltas], weights=[1, 1, 1], base=base, density=0.5)
    # density 0.5 keeps the 2 largest magnitudes: (3,0,2,0), (-2,-4,0,0), (1.5,0,-3,0)
    # entry 0: mass 2.5 -> +, agreeing 3 and 1.5 -> 2.25
    # entry 1: mass -4 -> -, agreeing -4 -> -4
    # entry 2: mass -1 -> - (one +, one -: the mass decides), agreeing -3 -> -3
    # entry 3: all pruned -> 0
    assert close(out, base + T([2.25, -4.0, -3.0, 0.0]))


def test_ties_weights_scale_agreeing_entries():
    base = torch.zeros(2)
    out = merging.merge_tensor("ties", [T([2.0, -1.0]), T([4.0, 1.0])], weights=[1.0, 0.5], base=base, density=1.0)
    # entry 0: both +, weighted 2 and 2 -> mean 2; entry 1: mass 0 -> + elected, only 0.5*1 agrees
    assert close(out, [2.0, 0.5])


def _dare_masks(seed: int, name: str, shapes: list[torch.Size], density: float) -> list[torch.Tensor]:
    torch.manual_seed(merging.tensor_seed(seed, name))
    return [torch.bernoulli(torch.full(s, density)) for s in shapes]


def test_dare_linear_with_fixed_seed():
    base = T([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    d1 = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0])
    d2 = T([0.5, 0.5, -0.5, -0.5, 1.0, 1.0])
    kwargs = dict(weights=[1.0, 2.0], base=base, density=0.5, seed=42, name="layer.weight")
    out = merging.merge_tensor("dare_linear", [base + d1, base + d2], **kwargs)
    m1, m2 = _dare_masks(42, "layer.weight", [d1.shape, d2.shape], 0.5)
    assert 0 < m1.sum() < 6 or 0 < m2.sum() < 6  # the seed really drops some entries
    expected = base + 1.0 * d1 * m1 / 0.5 + 2.0 * d2 * m2 / 0.5
    assert close(out, expected)
    # Same seed and name: same result; another seed: different masks.
    assert torch.equal(out, merging.merge_tensor("dare_linear", [base + d1, base + d2], **kwargs))
    other = merging.merge_tensor("dare_linear", [base + d1, base + d2], **{**kwargs, "seed": 7})
    assert not torch.equal(out, other)


def test_dare_ties_with_fixed_seed():
    base = torch.zeros(6)
    d1 = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0])
    d2 = T([-3.0, 0.5, -0.5, 2.0, 1.0, 1.0])
    out = merging.merge_tensor("dare_ties", [d1, d2], weights=[1.0, 1.0], base=base, density=0.5, seed=3, name="w")
    m1, m2 = _dare_masks(3, "w", [d1.shape, d2.shape], 0.5)
    r1, r2 = d1 * m1 / 0.5, d2 * m2 / 0.5
    expected = []
    for a, b in zip(r1.tolist(), r2.tolist(), strict=True):
        sign = 1.0 if a + b >= 0 else -1.0
        agree = [x for x in (a, b) if x != 0 and math.copysign(1, x) == sign]
        expected.append(sum(agree) / max(len(agree), 1))
    assert close(out, expected)


def test_dare_is_unbiased_on_average():
    base = torch.zeros(8)
    d = torch.arange(1.0, 9.0)
    runs = torch.stack(
        [
            merging.merge_tensor("dare_linear", [d], weights=[1.0], base=base, density=0.5, seed=s, name="x")
            for s in range(400)
        ]
    )
    assert torch.allclose(runs.mean(0), d, rtol=0.15)


def test_slerp_known_vectors():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    assert close(merging.slerp(a, b, 0.0), [1.0, 0.0])
    assert close(merging.slerp(a, b, 1.0), [0.0, 1.0])
    h = math.sqrt(0.5)
    assert close(merging.slerp(a, b, 0.5), [h, h])  # on the unit circle, unlike lerp's (0.5, 0.5)
    # Norms are carried along: sin(45°)/sin(90°) * (2,0) + sin(45°)/sin(90°) * (0,1)
    assert close(merging.slerp(T([2.0, 0.0]), b, 0.5), [2 * h, h])
    # 120° apart, t=0.5: each weight sin(60°)/sin(120°) = 1
    c = T([math.cos(2 * math.pi / 3), math.sin(2 * math.pi / 3)])
    assert close(merging.slerp(a, c, 0.5), a + c)


def test_slerp_falls_back_to_linear_for_parallel_and_zero_vectors():
    assert close(merging.slerp(T([1.0, 1.0]), T([2.0, 2.0]), 0.5), [1.5, 1.5])
    assert close(merging.slerp(T([0.0, 0.0]), T([2.0, 4.0]), 0.25), [0.5, 1.0])
    assert close(merging.merge_tensor("slerp", [T([1.0, 0.0]), T([0.0, 1.0])], weights=[1, 1], t=0.0), [1.0, 0.0])


def test_integer_tensors_are_kept_and_missing_base_is_an_error():
    ints = merging.merge_tensor("linear", [T([1, 2]), T([3, 4])], weights=[1, 1])
    assert ints.tolist() == [1, 2]
    with pytest.raises(ValueError, match="needs a base"):
        merging.merge_tensor("ties", [T([1.0])], weights=[1.0])


# --------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = char_tokenizer()
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        model, _ = tiny_model(tokenizer, hidden=16, layers=1, seed=i)
        out[name] = save_tiny(root / name, model, tokenizer)
    return out


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_merge_models_linear_matches_state_dict_average_and_loads(three_models, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = three_models["a"], three_models["b"]
    stats = merging.merge_models([a, b], tmp_path / "out", method="linear", weights=[1.0, 3.0])
    sa, sb, merged = _state(a), _state(b), _state(tmp_path / "out")
    assert set(merged) == set(sa)
    for name in sa:
        assert torch.allclose(merged[name], 0.25 * sa[name] + 0.75 * sb[name], atol=1e-6)
    assert stats["tensors"] == len(sa) and stats["parameters"] == sum(t.numel() for t in sa.values())
    # Closer to b (weight 0.75) than to a.
    assert stats["l2_distance_to_inputs"][1] < stats["l2_distance_to_inputs"][0]
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "out" / f).is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    assert torch.allclose(model.model.embed_tokens.weight, merged["model.embed_tokens.weight"])


def test_merge_models_task_arithmetic_uses_base(three_models, tmp_path):
    base, a, b = three_models["base"], three_models["a"], three_models["b"]
    merging.merge_models([a, b], tmp_path / "out", method="task_arithmetic", weights=[0.5, 0.5], base_dir=base)
    s0, sa, sb, merged = _state(base), _state(a), _state(b), _state(tmp_path / "out")
    for name in s0:
        expected = s0[name] + 0.5 * (sa[name] - s0[name]) + 0.5 * (sb[name] - s0[name])
        assert torch.allclose(merged[name], expected, atol=1e-5)


def test_incompatible_shapes_fail_clearly(three_models, tmp_path):
    model, tok = tiny_model(char_tokenizer(), hidden=32, layers=1, seed=5)
    wide = save_tiny(tmp_path / "wide", model, tok)
    with pytest.raises(StageError, match="one fine-tuning line") as info:
        merging.merge_models([three_models["a"], wide], tmp_path / "out", method="linear")
    assert "shape" in str(info.value)


def test_incompatible_tokenizer_fails_clearly(three_models, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "othertok"
    folder.mkdir()
    for f in three_models["a"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    # Swap two token ids: same size, different meaning.
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    AutoTokenizer.from_pretrained(folder)  # still a valid tokenizer
    with pytest.raises(StageError, match="tokenizer"):
        merging.merge_models([three_models["a"], folder], tmp_path / "out", method="linear")


def test_same_line_check_uses_lineage(tmp_path):
    def lineage(folder: Path, own: str, parents: list[str]) -> Path:
        folder.mkdir()
        record = {"content_hash": own, "parents": [{"content_hash": p, "path": "gone"} for p in parents]}
        (folder / "lineage.json").write_text(json.dumps(record))
        return folder

    sft = lineage(tmp_path / "sft", "h-sft", ["h-cpt"])
    grpo = lineage(tmp_path / "grpo", "h-grpo", ["h-sft"])
    other = lineage(tmp_path / "other", "h-other", ["h-scratch"])
    merging.check_same_line([sft, grpo], tmp_path)  # grpo descends from sft
    with pytest.raises(StageError, match="share no ancestor"):
        merging.check_same_line([sft, other], tmp_path)


def test_last_checkpoints_counts_only_complete_ones_of_newest_run(tmp_path):
    old = tmp_path / "checkpoints" / "sft-aaaa"
    new = tmp_path / "checkpoints" / "sft-bbbb"
    for run, steps in ((old, [10, 20]), (new, [100, 200, 300, 400])):
        for step in steps:
            folder = run / f"checkpoint-{step}"
            folder.mkdir(parents=True)
            if step != 400:  # the newest checkpoint was interrupted: no marker
                (folder / "COMPLETE").write_text("")
    os.utime(old, (time.time() - 100, time.time() - 100))
    found = merging.last_checkpoints(tmp_path, "sft", 2)
    assert [p.name for p in found] == ["checkpoint-200", "checkpoint-300"]
    with pytest.raises(StageError, match="no checkpoint folder"):
        merging.last_checkpoints(tmp_path, "grpo", 2)
