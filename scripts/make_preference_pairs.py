"""Write the SmolLM2 recipe's DPO preference pairs: configs/data/addition_preferences.jsonl.

Conversational pairs in TRL's preference format, shaped like a user's own file:

    {"prompt": [{"role": "user", "content": "23+58="}],
     "chosen": [{"role": "assistant", "content": "81"}],
     "rejected": [{"role": "assistant", "content": "71"}]}

The prompts are items of the `add` domain's item space (2-digit addition, the project's own
generator) that the recipe's `add` domain does not draw, so no pair shares a prompt with any of its
train, val or test items (the prepare stage's decontamination would refuse that); `rejected` is the
data layer's plausible wrong answer (a carry error or a digit slip,
`posttrain.data.domains.wrong_answer`). Deterministic:

    python scripts/make_preference_pairs.py [--params configs/smollm2-135m.yaml] [--n 400]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posttrain.config import load_params  # noqa: E402
from posttrain.data.domains import generate, make_generator, make_record, wrong_answer  # noqa: E402

OUT = ROOT / "configs" / "data" / "addition_preferences.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "configs" / "smollm2-135m.yaml")
    parser.add_argument("--domain", default="add")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    config = params.data.domains[args.domain]
    drawn = {r["prompt"] for r in generate(args.domain, config, params.data.seed)}
    generator = make_generator(config)
    items = [generator.item(i) for i in range(generator.size())]
    unused = [make_record(args.domain, prompt=p, answer=a, verifier="exact") for p, a in items if p not in drawn]
    rng = random.Random(f"preferences:{params.data.seed}")
    rows = []
    for record in rng.sample(unused, min(args.n, len(unused))):
        rows.append(
            {
                "prompt": [{"role": "user", "content": record["prompt"]}],
                "chosen": [{"role": "assistant", "content": record["answer"]}],
                "rejected": [{"role": "assistant", "content": wrong_answer(record, rng)}],
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} pairs -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
