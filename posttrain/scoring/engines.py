"""Generation engines: what turns prompt token ids into completion token ids (docs/generation.md).

    hf     transformers' `generate` on left-padded batches; every device; the reference
    paged  transformers' continuous batching (`generate_batch`: paged KV cache, no padding, finished
           rows leave the batch at once); every device, transformers >= 5.8
    vllm   vLLM through TRL's own `VLLMGeneration` (colocate or server, sleep mode for colocate);
           CUDA only, `pip install -e '.[vllm]'`

Every engine answers a `GenerationRequest` with the same shape: per prompt, `n` token-id lists, each
cut after its first EOS (the EOS kept: it was generated). `posttrain.scoring.generation` turns text
into ids and ids back into text around them, so callers never see which engine ran. GRPO's rollouts
use TRL's own switches for the same engines (posttrain.training.trl_config.engine_fields).

`resolve_engine` picks the engine a stage runs: the one named, refused by name with how to install
it when it is not usable here, or for `auto` the default of the device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
import weakref
from dataclasses import dataclass, replace
from importlib import metadata
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from posttrain.errors import ParamsError, StageError

if TYPE_CHECKING:
    from posttrain.config import EngineConfig, Params

ENGINES = ("hf", "paged", "vllm")
# `auto` on CUDA: the first of these that is installed. The order follows published figures (TRL's
# docs: vLLM ahead of transformers' own generation); bench/rollout_check.sh measures paged against hf
# on a GPU, and that check has not run yet (docs/generation.md): the order is not measured here.
CUDA_PREFERENCE = ("vllm", "paged", "hf")
# `auto` on CPU: hf. paged was measured against it on CPU (bench/engines_cpu.py,
# artifacts/bench/engines_cpu.json; docs/generation.md): faster on the SmolLM2 recipe's evaluation,
# ~12x slower per call on the default recipe's ~1M-parameter model (its continual evaluation makes
# many small calls), and its sampler draws other samples, so GRPO rollouts and on-policy DPO pairs,
# hence the default recipe's models, would change with it.
CPU_DEFAULT = "hf"
PAGED_MIN_TRANSFORMERS = "5.8.0"
INSTALL_HINT = {
    "paged": f"upgrade transformers to >= {PAGED_MIN_TRANSFORMERS} (pip install -U 'transformers>={PAGED_MIN_TRANSFORMERS}')",
    "vllm": "install the vllm extra: pip install -e '.[vllm]' (needs a CUDA GPU; the versions TRL supports)",
}
# Share of free GPU memory the paged KV cache may take: transformers' default (0.9) would leave a
# training stage nothing for its own step; 0.5 is what TRL's GRPOTrainer uses for the same reason.
PAGED_MAX_MEMORY_PERCENT = 0.5
# Off CUDA transformers sizes the cache at 60% of the machine's RAM (TRL's GRPO path: 50%) and
# zeroes it: ~35 s per call for a 20k-parameter model on the project's 24 GiB machine, and a GRPO
# run on it was killed for memory. There the cache is sized to the request instead (every sequence
# resident at once), in small pages (short sequences waste less of their last page), and at most
# PAGED_CPU_CACHE_BYTES.
PAGED_CPU_PAGE_SIZE = 32
PAGED_CPU_CACHE_BYTES = 2 * 2**30


def unavailable(engine: str) -> str | None:
    """Why `engine` cannot run in this environment (with how to fix it), or None when it can."""
    if engine == "hf":
        return None
    if engine == "paged":
        installed = metadata.version("transformers")
        if Version(installed) < Version(PAGED_MIN_TRANSFORMERS):
            return f"transformers {installed} has no continuous batching; {INSTALL_HINT['paged']}"
        return None
    if engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            return f"vLLM is not installed; {INSTALL_HINT['vllm']}"
        return None
    raise ValueError(f"unknown engine {engine!r}; expected one of {list(ENGINES)}")


def resolve_engine(choice: str, device: str, key: str) -> str:
    """The engine a stage runs for the setting `choice` at `key` (e.g. `compute.generation.engine`)."""
    if choice == "auto":
        if device == "cuda":
            return next(e for e in CUDA_PREFERENCE if unavailable(e) is None)
        return CPU_DEFAULT
    if choice not in ENGINES:
        raise ParamsError(f"{key}: got {choice!r}; expected auto or one of {list(ENGINES)}")
    why = unavailable(choice)
    if why is not None:
        raise ParamsError(f"{key}: engine {choice!r} is not available here: {why}")
    if choice == "vllm" and device != "cuda":
        raise ParamsError(
            f"{key}: engine 'vllm' needs a CUDA device, this stage runs on {device}; expected hf or paged"
        )
    return choice


def stage_engine(params: Params, stage: str, device: str) -> tuple[str, EngineConfig]:
    """(engine, its settings) for `stage`: `<stage>.generation` where set, else `compute.generation`."""
    options, key = params.generation_for(stage)
    return resolve_engine(options.engine, device, f"{key}.engine"), options


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate for every prompt; the same for every engine."""

    max_new_tokens: int
    eos_id: int | None
    pad_id: int
    do_sample: bool = False
    temperature: float = 1.0
    n: int = 1  # sequences per prompt
    seed: int | None = None
    batch_size: int = 128  # hf: rows per `generate` call (paged and vllm schedule their own batches)


@dataclass
class GenerationStats:
    """What an engine generated: wall seconds and generated tokens (each sequence's EOS included)."""

    seconds: float = 0.0
    tokens: int = 0
    sequences: int = 0

    def add(self, seconds: float, sequences: list[list[list[int]]]) -> None:
        self.seconds += seconds
        self.tokens += sum(len(ids) for group in sequences for ids in group)
        self.sequences += sum(len(group) for group in sequences)

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def as_dict(self) -> dict[str, Any]:
        rate = self.tokens_per_second
        return {
            "generated_tokens": self.tokens,
            "sequences": self.sequences,
            "seconds": round(self.seconds, 4),
            "tokens_per_second": None if rate is None else round(rate, 2),
        }


def cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """`ids` up to and including the first EOS (what follows it is padding or nothing)."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def run_engine(
    engine: str,
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    request: GenerationRequest,
    options: EngineConfig | None = None,
) -> list[list[list[int]]]:
    """Per prompt, `request.n` generated token-id lists (cut after the first EOS, which is kept).

    The model is put in eval mode and restored; the caller's random state is left untouched (seeded
    sampling forks the RNG), so generating inside a training run does not change that run.
    """
    import torch

    if not prompt_ids:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    # paged: no_grad, not inference_mode: generate_batch allocates its KV cache here but updates it in
    # its own thread, where inference tensors cannot be written ("Inplace update to inference tensor").
    no_grad = torch.no_grad() if engine == "paged" else torch.inference_mode()
    try:
        with torch.random.fork_rng(devices=rng_devices), no_grad:
            if request.seed is not None:
                torch.manual_seed(request.seed)
            if engine == "hf":
                out = _hf(model, prompt_ids, request)
            elif engine == "paged":
                out = _paged(model, prompt_ids, request)
            elif engine == "vllm":
                out = _vllm(model, tokenizer, prompt_ids, request, options)
            else:
                raise ValueError(f"unknown engine {engine!r}; expected one of {list(ENGINES)}")
    finally:
        model.train(was_training)
    if len(out) != len(prompt_ids) or any(len(group) != request.n for group in out):
        raise StageError(
            f"generation engine {engine!r} returned {sum(map(len, out))} sequences for {len(prompt_ids)} prompts "
            f"x {request.n}; expected every prompt's {request.n} (see the engine's log above)"
        )
    return out


def timed_run(
    engine: str,
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    request: GenerationRequest,
    options: EngineConfig | None = None,
    stats: GenerationStats | None = None,
) -> list[list[list[int]]]:
    """`run_engine`, adding its wall time and generated tokens to `stats` (when given)."""
    started = time.perf_counter()
    out = run_engine(engine, model, tokenizer, prompt_ids, request, options)
    if stats is not None:
        if next(model.parameters()).device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        stats.add(time.perf_counter() - started, out)
    return out


def _generation_config(request: GenerationRequest) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=request.max_new_tokens,
        do_sample=request.do_sample,
        num_beams=1,
        num_return_sequences=request.n,
        pad_token_id=request.pad_id,
        eos_token_id=request.eos_id,
        # Explicit, so a model's saved generation_config (top_k=50, max_length, ...) cannot change
        # what is measured: plain temperature sampling, no truncation.
        **({"temperature": request.temperature, "top_k": 0, "top_p": 1.0} if request.do_sample else {}),
    )


def _hf(model: Any, prompt_ids: list[list[int]], request: GenerationRequest) -> list[list[list[int]]]:
    """Left-padded batches, sorted by length (little padding); each row's next token sits in the last
    column, so batched greedy decoding equals one-by-one greedy decoding (position ids come from the
    attention mask inside `generate`)."""
    import torch

    config = _generation_config(request)
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[list[list[int]]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), request.batch_size):
        rows = order[start : start + request.batch_size]
        width = max(len(prompt_ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), request.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = prompt_ids[i]
            if ids:
                input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[r, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        for j, ids in enumerate(output[:, width:].tolist()):
            # Rows of one prompt are consecutive (generate repeats each prompt in place).
            results[rows[j // request.n]].append(cut_at_eos(ids, request.eos_id))
    return results


def _paged(model: Any, prompt_ids: list[list[int]], request: GenerationRequest) -> list[list[list[int]]]:
    """transformers' continuous batching. Each prompt is sent `n` times, one sequence per request (as
    TRL's GRPO does): transformers 5.17 (the lent GPU machine's) ignores `num_return_sequences` here.
    Results come back keyed by request, in the order sent. `generate_batch` logs a failed request
    instead of raising: a missing or failed sequence is refused here."""
    from transformers.generation import ContinuousBatchingConfig

    requests = [list(ids) for ids in prompt_ids for _ in range(request.n)]
    outputs = model.generate_batch(
        requests,
        generation_config=_generation_config(replace(request, n=1)),
        continuous_batching_config=ContinuousBatchingConfig(
            seed=request.seed, **paged_cache(model, [len(ids) + request.max_new_tokens for ids in requests])
        ),
        progress_bar=False,
    )
    flat = [cut_at_eos(list(out.generated_tokens), request.eos_id) for out in outputs.values() if out.error is None]
    if len(flat) != len(requests):
        raise StageError(
            f"generation engine 'paged': transformers' generate_batch returned {len(flat)} finished sequences "
            f"for {len(prompt_ids)} prompts x {request.n}; the failed requests are in its log above"
        )
    return [flat[i * request.n : (i + 1) * request.n] for i in range(len(prompt_ids))]


def paged_cache(model: Any, sequence_tokens: list[int]) -> dict[str, Any]:
    """ContinuousBatchingConfig fields that size the paged KV cache for sequences of `sequence_tokens`
    tokens each (prompt + new tokens): on CUDA a share of free memory, elsewhere the request's own
    size in small pages, at most PAGED_CPU_CACHE_BYTES (see PAGED_* above). Also what GRPO's rollouts
    through TRL get (posttrain.training.trl_config.engine_fields)."""
    param = next(model.parameters())
    if param.device.type == "cuda":
        return {"max_memory_percent": PAGED_MAX_MEMORY_PERCENT}
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    # A block holds one page of tokens for every layer: keys and values.
    block_bytes = PAGED_CPU_PAGE_SIZE * config.num_hidden_layers * 2 * kv_heads * head_dim * param.element_size()
    pages = sum(-(-tokens // PAGED_CPU_PAGE_SIZE) for tokens in sequence_tokens)
    blocks = max(1, min(pages, PAGED_CPU_CACHE_BYTES // block_bytes))
    return {_page_size_field(): PAGED_CPU_PAGE_SIZE, "num_blocks": blocks}


def _page_size_field() -> str:
    """The name of tokens-per-cache-block: `page_size` in transformers 5.23 (the lock), `block_size` in
    5.17 (the lent GPU machine's; 5.23 still accepts it, with a deprecation warning)."""
    from transformers.generation import ContinuousBatchingConfig

    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    return "page_size" if "page_size" in names else "block_size"


# One vLLM engine per model object: building one loads the model into vLLM (tens of seconds).
_VLLM_ENGINES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _vllm(
    model: Any, tokenizer: Any, prompt_ids: list[list[int]], request: GenerationRequest, options: EngineConfig | None
) -> list[list[list[int]]]:
    """vLLM through TRL's `VLLMGeneration` (the class GRPOTrainer itself uses), kept per model.

    Not run on this project's machines (no CUDA, vLLM not installed): written against TRL 1.16's
    VLLMGeneration. The model's current weights are pushed to vLLM before each call, so a model that
    trained since the last call is the one that generates. Greedy is temperature 0 in vLLM. Sampling
    follows vLLM's engine seed, not `request.seed`: a per-request seed would make the n copies of a
    prompt draw the same sample.
    """
    if options is None:
        raise ValueError("engine 'vllm' needs its EngineConfig (vllm_mode, ...)")
    generator = _VLLM_ENGINES.get(model)
    if generator is None:
        from accelerate import Accelerator
        from trl.generation.vllm_generation import VLLMGeneration

        url = options.vllm_server_url
        generator = VLLMGeneration(
            model=model,
            accelerator=Accelerator(),
            processing_class=tokenizer,
            mode=options.vllm_mode,
            server_base_url=url,
            gpu_memory_utilization=options.vllm_gpu_memory_utilization,
            enable_sleep_mode=options.vllm_sleep_mode and options.vllm_mode == "colocate",
            logprobs=None,
        )
        _VLLM_ENGINES[model] = generator
    # VLLMGeneration reads these attributes on every generate() call (TRL 1.16).
    generator.temperature = request.temperature if request.do_sample else 0.0
    generator.max_completion_length = request.max_new_tokens
    generator.sync_weights()
    repeated = [list(ids) for ids in prompt_ids for _ in range(request.n)]
    _, completion_ids, _, _ = generator.generate(prompts=repeated, images=None, num_generations=request.n)
    flat = [cut_at_eos(list(ids), request.eos_id) for ids in completion_ids]
    return [flat[i * request.n : (i + 1) * request.n] for i in range(len(prompt_ids))]
