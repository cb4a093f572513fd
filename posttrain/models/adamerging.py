"""AdaMerging (Yang et al. 2024): task-vector coefficients learned by entropy minimisation.

The merged model is base + sum_k lambda_k * (model_k - base), as in task arithmetic, but the
lambdas are learned: Adam minimises the mean entropy of the merged model's next-token
distributions on unlabeled prompts (the validation split's prompts, never test data). For a
language model the entropy is taken where the model answers: the positions predicting the tokens
of its own greedy completion (and its end-of-sequence token), which are regenerated with the
current coefficients every `refresh` steps. The prompt positions are left out: a prompt's own
tokens (random digits) are not predictable, and lowering their entropy would reward memorisation.

Coefficients are kept in [0, 1] (projected after each Adam step).

- `task` granularity: one lambda per task vector;
- `layer` granularity: one lambda per task vector and parameter tensor (AdaMerging's layer-wise).
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import StageError
from posttrain.models.merging import WEIGHT_FILES, check_compatible_folders
from posttrain.scoring.generation import encode_prompts

log = logging.getLogger(__name__)

GRANULARITIES = ("task", "layer")


def _answer_batch(tokenizer: Any, prompts: list[list[int]], completions: list[list[int]]) -> tuple[Any, Any, Any]:
    """Right-padded prompt+completion ids, attention mask, and a mask of the positions whose next
    token is a completion token (the logits there are the answer's predictions)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        answer[i, len(p) - 1 : len(p) + len(c) - 1] = True  # logits at t predict token t + 1
    return ids, attention, answer


def _greedy_completions(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy completion ids of each prompt, cut after the first EOS (kept: stopping is an answer too)."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding for generation
        ids[i, width - len(p) :] = torch.tensor(p)
        attention[i, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
    completions = []
    for row in out[:, width:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        completions.append(row[:cut] or [eos])
    return completions


def adamerge(
    model_dirs: Sequence[Path],
    base_dir: Path,
    out_dir: Path,
    prompts: Sequence[str],
    *,
    granularity: str = "task",
    steps: int = 60,
    lr: float = 0.05,
    init: float = 0.5,
    batch_size: int = 64,
    refresh: int = 10,
    max_new_tokens: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Learn the coefficients, write base + sum lambda * task vector to `out_dir` (save_pretrained
    files and the tokenizer of the first model); return the coefficients and the entropy curve."""
    import torch
    from safetensors.torch import save_file
    from torch.func import functional_call
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if granularity not in GRANULARITIES:
        raise StageError(f"adamerging granularity {granularity!r}; expected one of {list(GRANULARITIES)}")
    if not prompts:
        raise StageError("adamerging needs unlabeled prompts (the validation split's); got none")
    model_dirs = [Path(d) for d in model_dirs]
    check_compatible_folders([Path(base_dir), *model_dirs])
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[0])
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    vectors: list[dict[str, torch.Tensor]] = []
    for folder in model_dirs:
        other = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
        vectors.append({n: (other[n].detach() - base[n]) for n in names})
    shape = (len(model_dirs),) if granularity == "task" else (len(names), len(model_dirs))
    coeffs = torch.full(shape, float(init), requires_grad=True)
    optimizer = torch.optim.Adam([coeffs], lr=lr)

    def merged_params(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for i, n in enumerate(names):
            row = lam if granularity == "task" else lam[i]
            out[n] = base[n] + sum(row[k] * vectors[k][n] for k in range(len(vectors)))
        return out

    def materialise() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(merged_params(coeffs.detach())[n])

    encoded = encode_prompts(tokenizer, list(prompts))
    pool = list(range(len(encoded)))
    completions: dict[int, list[int]] = {}
    history: list[dict[str, float]] = []
    for step in range(steps + 1):
        if step % refresh == 0:  # the answers the current merge gives, entropy measured on them
            materialise()
            for start in range(0, len(encoded), 256):
                chunk = pool[start : start + 256]
                for i, c in zip(
                    chunk,
                    _greedy_completions(model, tokenizer, [encoded[i] for i in chunk], max_new_tokens),
                    strict=True,
                ):
                    completions[i] = c
        batch = rng.sample(pool, min(batch_size, len(pool)))
        ids, attention, answer = _answer_batch(tokenizer, [encoded[i] for i in batch], [completions[i] for i in batch])
        logits = functional_call(
            model, merged_params(coeffs), args=(), kwargs={"input_ids": ids, "attention_mask": attention}
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)[answer].mean()
        history.append({"step": step, "entropy": float(entropy.detach())})
        if step == steps:
            break  # the last entry measures the final coefficients
        optimizer.zero_grad()
        entropy.backward()
        optimizer.step()
        with torch.no_grad():
            # Projected onto [0, 1]: unconstrained, entropy minimisation drove a task vector's
            # coefficient below zero (subtracting a skill makes the model confidently wrong).
            coeffs.clamp_(0.0, 1.0)

    materialise()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    # Tied weights appear twice in a state dict; safetensors stores a shared tensor once.
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for path in sorted(model_dirs[0].iterdir()):
        if path.is_file() and path.name not in WEIGHT_FILES and path.name != "lineage.json":
            if path.suffix in (".json", ".txt", ".model", ".jinja") or path.name.startswith("tokenizer"):
                shutil.copy2(path, out_dir / path.name)
    final = coeffs.detach()
    if granularity == "task":
        coefficients: Any = [round(float(x), 6) for x in final]
    else:
        coefficients = {n: [round(float(x), 6) for x in final[i]] for i, n in enumerate(names)}
    return {
        "method": "adamerging",
        "granularity": granularity,
        "init": init,
        "coefficients": coefficients,
        "mean_coefficient_per_model": [round(float(x), 6) for x in final.reshape(-1, len(model_dirs)).mean(0)],
        "entropy_before": history[0]["entropy"],
        "entropy_after": history[-1]["entropy"],
        "entropy_curve": history,
        "prompts": len(encoded),
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 3),
    }
