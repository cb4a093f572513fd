"""Generation engines (posttrain.scoring.engines): which engine a stage runs, the refusal of an engine
that is not usable here, and hf and paged agreeing item for item on a tiny model on CPU."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.tiny import tiny_model, tiny_params

from posttrain.errors import ParamsError
from posttrain.scoring import engines
from posttrain.scoring.engines import GenerationRequest, GenerationStats, resolve_engine, run_engine, stage_engine
from posttrain.scoring.generation import encode_prompts, generate
from posttrain.training.trl_config import engine_fields

RNG = random.Random(0)
PROMPTS = [f"{RNG.randint(1, 999)}+{RNG.randint(1, 999)}=" for _ in range(40)] + [
    "rev:" + "".join(RNG.choice("abcdefgh") for _ in range(RNG.randint(2, 9))) + "=" for _ in range(40)
]


# --------------------------------------------------------------------------- selection and refusal


def test_auto_is_hf_on_cpu_and_the_fastest_installed_on_cuda() -> None:
    assert resolve_engine("auto", "cpu", "compute.generation.engine") == "hf"
    installed = [e for e in engines.CUDA_PREFERENCE if engines.unavailable(e) is None]
    assert resolve_engine("auto", "cuda", "compute.generation.engine") == installed[0]
    # Here (transformers 5.23, no vLLM) that is paged: the preference order skips what is missing.
    assert engines.unavailable("paged") is None and engines.unavailable("vllm") is not None
    assert resolve_engine("auto", "cuda", "k") == "paged"
    assert resolve_engine("paged", "cpu", "k") == "paged" and resolve_engine("hf", "cuda", "k") == "hf"


def test_an_engine_that_is_not_installed_is_refused_by_name_with_how_to_install_it() -> None:
    with pytest.raises(ParamsError) as error:
        resolve_engine("vllm", "cuda", "grpo.generation.engine")
    message = str(error.value)
    assert "grpo.generation.engine" in message and "'vllm' is not available" in message
    assert "pip install -e '.[vllm]'" in message
    with pytest.raises(ParamsError, match="expected auto or one of"):
        resolve_engine("sglang", "cpu", "compute.generation.engine")


def test_vllm_needs_cuda_even_when_installed(monkeypatch) -> None:
    monkeypatch.setattr(engines, "unavailable", lambda engine: None)  # as on a machine with vLLM
    assert resolve_engine("vllm", "cuda", "k") == "vllm"
    assert resolve_engine("auto", "cuda", "k") == "vllm"  # first in the CUDA preference
    with pytest.raises(ParamsError, match=r"compute.generation.engine: engine 'vllm' needs a CUDA device"):
        resolve_engine("vllm", "cpu", "compute.generation.engine")


def test_a_stage_uses_its_own_setting_else_compute() -> None:
    params = tiny_params(compute={"generation": {"engine": "paged"}}, grpo={"generation": {"engine": "hf"}})
    assert params.generation_for("sft") == (params.compute.generation, "compute.generation")
    assert params.generation_for("grpo")[1] == "grpo.generation"
    assert stage_engine(params, "grpo", "cpu") == ("hf", params.grpo.generation)
    assert stage_engine(params, "evaluate", "cpu")[0] == "paged"
    refused = tiny_params(evaluate={"generation": {"engine": "vllm"}})
    with pytest.raises(ParamsError, match="evaluate.generation.engine: engine 'vllm' is not available"):
        stage_engine(refused, "evaluate", "cpu")


def test_engine_switches_in_trainer_are_refused_at_validation() -> None:
    with pytest.raises(ParamsError) as error:
        tiny_params(grpo={"trainer": {"use_vllm": True}})
    assert "grpo: " in str(error.value) and "trainer.use_vllm" in str(error.value)
    assert "generation" in str(error.value)
    with pytest.raises(ParamsError, match="trainer.use_transformers_continuous_batching"):
        tiny_params(grpo={"trainer": {"use_transformers_continuous_batching": True}})
    with pytest.raises(ParamsError, match="unknown key"):
        tiny_params(compute={"generation": {"engine": "hf", "colour": "blue"}})


def test_grpo_gets_trl_s_own_switch_for_each_engine() -> None:
    options = tiny_params().compute.generation
    assert engine_fields("hf", options) == {}  # TRL's default path: generate
    cache = {"page_size": 32, "num_blocks": 12}  # engines.paged_cache: the KV cache TRL's generate_batch gets
    assert engine_fields("paged", options, cache) == {
        "use_transformers_continuous_batching": True, "transformers_continuous_batching_config": cache,
    }  # fmt: skip
    assert engine_fields("vllm", options) == {
        "use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3, "vllm_enable_sleep_mode": True,
    }  # fmt: skip
    server = options.model_copy(update={"vllm_mode": "server", "vllm_server_url": "http://gpu7:8000"})
    fields = engine_fields("vllm", server)
    assert fields["vllm_mode"] == "server" and fields["vllm_server_base_url"] == "http://gpu7:8000"
    assert fields["vllm_enable_sleep_mode"] is False  # sleep mode is colocate's


# --------------------------------------------------------------------------- equal results


def _token_ids(engine: str, model, tokenizer, prompts: list[str], **request) -> list[list[int]]:
    ids = encode_prompts(tokenizer, prompts)
    defaults = {"max_new_tokens": 10, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    return [group[0] for group in run_engine(engine, model, tokenizer, ids, GenerationRequest(**defaults | request))]


def first_difference_gap(model, prompt_ids: list[int], a: list[int], b: list[int]) -> float:
    """|logit(a_k) - logit(b_k)| at the first position k where two greedy completions differ."""
    k = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + a[:k]])).logits[0, -1].float()
    return abs(float(logits[a[k]] - logits[b[k]]))


@pytest.mark.parametrize(("dtype", "tie", "seeds"), [(torch.float32, 1e-4, (0, 1)), (torch.bfloat16, 0.125, (2,))])
def test_hf_and_paged_greedy_agree_item_for_item(dtype, tie, seeds) -> None:
    """Greedy decoding is an argmax: the two engines differ only where the two best logits are so close
    that another summation order (padded batch vs packed variable-length batch) swaps them. Measured:
    they agree on every item here, in fp32 and in bf16 (seeds 0-2 each); any future difference must be
    such a tie, within `tie` of each other (fp32: 1e-4; bf16 keeps 8 bits of mantissa, so logits of
    a few units are only resolved to ~1/64-1/32 and a sum of such terms to ~1/8)."""
    for seed in seeds:
        model, tokenizer = tiny_model(hidden=64, layers=2, seed=seed)
        model = model.to(dtype).eval()
        hf = _token_ids("hf", model, tokenizer, PROMPTS, batch_size=16)
        paged = _token_ids("paged", model, tokenizer, PROMPTS)
        assert any(len(ids) > 1 for ids in hf)  # a random model writes something: the comparison is not empty
        differ = [i for i in range(len(PROMPTS)) if hf[i] != paged[i]]
        assert len(differ) <= 0.01 * len(PROMPTS), (dtype, seed, differ)
        prompt_ids = encode_prompts(tokenizer, PROMPTS)
        for i in differ:
            assert first_difference_gap(model, prompt_ids[i], hf[i], paged[i]) <= tie, (dtype, seed, i)


def test_paged_through_the_text_api_matches_hf_and_counts_tokens() -> None:
    model, tokenizer = tiny_model(hidden=32, layers=2, seed=1)
    prompts = PROMPTS[:16]
    stats = {e: GenerationStats() for e in ("hf", "paged")}
    out = {e: generate(model, tokenizer, prompts, max_new_tokens=8, engine=e, stats=stats[e]) for e in stats}
    assert out["hf"] == out["paged"] and any(group[0] for group in out["hf"])
    produced = sum(len(ids) for ids in _token_ids("hf", model, tokenizer, prompts, max_new_tokens=8))
    for s in stats.values():  # the same tokens counted, whichever engine produced them
        assert s.tokens == produced and s.sequences == 16 and s.seconds > 0
        assert s.as_dict()["tokens_per_second"] == pytest.approx(s.tokens / s.seconds, rel=1e-2)


def test_a_sequence_is_cut_after_its_first_eos_which_counts_as_generated() -> None:
    assert engines.cut_at_eos([5, 6, 2, 0, 0], eos_id=2) == [5, 6, 2]
    assert engines.cut_at_eos([5, 6, 7], eos_id=2) == [5, 6, 7] and engines.cut_at_eos([5, 2], None) == [5, 2]
    stats = GenerationStats()
    stats.add(2.0, [[[5, 6, 2]], [[7, 2], [8, 9, 9, 2]]])
    assert (stats.tokens, stats.sequences, stats.tokens_per_second) == (9, 3, 4.5)
    model, tokenizer = tiny_model(hidden=32, layers=2, seed=1)
    # Decoded text leaves the EOS out, as before the engines existed.
    eos = tokenizer.eos_token_id
    ids = _token_ids("hf", model, tokenizer, PROMPTS[:16], max_new_tokens=30)
    ended = [row for row in ids if row[-1] == eos]
    texts = [g[0] for g in generate(model, tokenizer, PROMPTS[:16], max_new_tokens=30)]
    for row, text in zip(ids, texts, strict=True):
        assert text == tokenizer.decode(row[:-1] if row[-1] == eos else row, skip_special_tokens=True)
    assert ended or all(len(row) == 30 for row in ids)


def test_paged_sampling_is_seeded_and_leaves_the_caller_s_rng_alone() -> None:
    model, tokenizer = tiny_model(hidden=32, layers=2, seed=0)
    state = torch.random.get_rng_state()
    kwargs = {"max_new_tokens": 5, "do_sample": True, "num_return_sequences": 3, "engine": "paged"}
    first = generate(model, tokenizer, PROMPTS[:4], seed=7, **kwargs)
    assert torch.equal(state, torch.random.get_rng_state())
    assert first == generate(model, tokenizer, PROMPTS[:4], seed=7, **kwargs)
    assert first != generate(model, tokenizer, PROMPTS[:4], seed=8, **kwargs)
    assert [len(group) for group in first] == [3, 3, 3, 3]
