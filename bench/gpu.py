"""GPU variant: SFT tokens/s and model FLOPs utilisation, and GRPO-style generation throughput, for a
~0.5B-parameter Llama built from a config (bf16), on synthetic token data.

    python bench/gpu.py --config gpu              # on a CUDA machine: the measurement
    python bench/gpu.py --config gpu --dry-run    # anywhere: build the config, count parameters, plan
    python bench/gpu.py --config cpu-smoke        # anywhere: the same code path with a tiny model, fp32 on CPU

MFU = tokens/s x FLOPs per token / peak FLOP/s, FLOPs per token = 6 x N (matmul parameters, the
input embedding lookup excluded) + 12 x layers x hidden x sequence length (attention scores),
the PaLM paper's formula (Chowdhery et al. 2022, appendix B). Peak: --peak-tflops (default 989,
H100 SXM dense bf16). GRPO's generation is measured as TRL does it without vLLM: `generate` on
prompts x num_generations sequences, sampling, a fixed number of new tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    # ~0.47B parameters: 24 x (4 x 1024^2 attention + 3 x 1024 x 4096 MLP) + 2 x 32000 x 1024 embeddings.
    "gpu": {
        "model": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=False),
        "seq_len": 1024, "batch": 16, "steps": 30, "warmup_steps": 5, "precision": "bf16",
        "gen_prompts": 16, "num_generations": 8, "prompt_len": 128, "new_tokens": 256,
    },
    "cpu-smoke": {
        "model": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False),
        "seq_len": 32, "batch": 8, "steps": 6, "warmup_steps": 2, "precision": "fp32",
        "gen_prompts": 2, "num_generations": 4, "prompt_len": 8, "new_tokens": 8,
    },
}  # fmt: skip


def build_config(name: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIGS[name]["model"], pad_token_id=0, eos_token_id=1, bos_token_id=None)


def count_parameters(config: Any) -> dict[str, int]:
    """Parameter counts without allocating weights (meta device)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "input_embedding": embedding, "matmul": total - embedding}


def flops_per_token(config: Any, n_matmul: int, seq_len: int) -> float:
    return 6.0 * n_matmul + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over `vocab_size` ids (t0 = pad, t1 = eos): the data is synthetic ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


def measure_sft(name: str, config: Any, device: str) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import LlamaForCausalLM, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    c = CONFIGS[name]
    set_seed(0)
    dtype = torch.bfloat16 if c["precision"] == "bf16" else torch.float32
    model = LlamaForCausalLM(config).to(dtype)
    g = torch.Generator().manual_seed(0)
    n_rows = c["batch"] * c["steps"]
    ids = torch.randint(3, config.vocab_size, (n_rows, c["seq_len"] - 1), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": [row + [1] for row in ids]})

    class Clock(TrainerCallback):
        marks: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.marks[state.global_step] = time.perf_counter()

    clock = Clock()
    args = SFTConfig(
        output_dir=str(Path("/tmp") / f"bench-gpu-{name}"), report_to="none", max_steps=c["steps"],
        per_device_train_batch_size=c["batch"], max_length=c["seq_len"], learning_rate=1e-4,
        bf16=c["precision"] == "bf16", fp16=False, use_cpu=device == "cpu", activation_checkpointing=False,
        save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0, packing=False,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(config.vocab_size),
                         callbacks=[clock])  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    w = c["warmup_steps"]
    seconds = clock.marks[c["steps"]] - clock.marks[w]
    tokens = c["batch"] * c["seq_len"] * (c["steps"] - w)
    return {
        "tokens_per_second": round(tokens / seconds, 1),
        "timed_steps": c["steps"] - w,
        "seconds": round(seconds, 3),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }


def measure_generation(name: str, config: Any, device: str) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    c = CONFIGS[name]
    dtype = torch.bfloat16 if c["precision"] == "bf16" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    rows = c["gen_prompts"] * c["num_generations"]
    prompts = torch.randint(3, config.vocab_size, (c["gen_prompts"], c["prompt_len"]), generator=g)
    batch = prompts.repeat_interleave(c["num_generations"], dim=0).to(device)
    kwargs = dict(do_sample=True, temperature=1.0, max_new_tokens=c["new_tokens"], min_new_tokens=c["new_tokens"],
                  pad_token_id=0, eos_token_id=1)  # fmt: skip
    with torch.no_grad():
        model.generate(batch[:2], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = model.generate(batch, attention_mask=torch.ones_like(batch), **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    new = (out.shape[1] - batch.shape[1]) * rows
    return {"generated_tokens_per_second": round(new / seconds, 1), "sequences": rows, "new_tokens": c["new_tokens"],
            "seconds": round(seconds, 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="gpu")
    parser.add_argument("--dry-run", action="store_true", help="build the config and plan only; no training")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak dense FLOP/s of the GPU (bf16), in TFLOP/s"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    config = build_config(args.config)
    counts = count_parameters(config)
    c = CONFIGS[args.config]
    fpt = flops_per_token(config, counts["matmul"], c["seq_len"])
    cuda = torch.cuda.is_available()
    result: dict[str, Any] = {
        "config": args.config,
        "settings": c,
        "parameters": counts,
        "flops_per_token": fpt,
        "cuda_available": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "measured": False,
    }
    if args.dry_run:
        result["note"] = "dry run: config built and parameters counted, nothing trained"
    elif args.config == "gpu" and not cuda:
        result["note"] = "no CUDA device: the gpu configuration was not measured (use --dry-run or a GPU machine)"
    else:
        device = "cuda" if cuda else "cpu"
        sft = measure_sft(args.config, config, device)
        if device == "cuda":
            sft["mfu"] = round(sft["tokens_per_second"] * fpt / (args.peak_tflops * 1e12), 4)
            sft["peak_tflops_assumed"] = args.peak_tflops
        result.update(
            measured=True, device=device, sft=sft, grpo_generation=measure_generation(args.config, config, device)
        )
        if device == "cpu":
            result["note"] = "code-path check on CPU with a tiny model: not a GPU measurement"
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
