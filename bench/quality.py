"""Quality ladder and CPT ablations.

Ladder: from the end-to-end run of the default recipe, per stage and per domain the held-out exact
match with its 95% bootstrap CI (artifacts/metrics/eval.json) and the wall time per stage.

Ablations, each in its own clone of that run: `dvc exp run -n <name> -S key=value ... cpt` reruns what
the change makes stale up to cpt (mix when the mixture changes, then cpt), then `stages.evaluate`
scores pretrain and cpt only (the descendants sft..grpo are not retrained for an ablation of cpt):
  - replay: cpt with the recipe's replay (25% of the pretrain mixture) vs without replay
    -> forgetting on the old domains (add, rev), gain on the new one (sub);
  - schedule: cosine re-warm vs WSD vs constant-with-cooldown, same steps, peak LR, warm-up and floor.

Over seeds (`--seed-roots A,B,C`: finished runs of the recipe up to cpt, one per seed, e.g. clones with
`seed:` set and `dvc repro cpt` done): in each root the recipe's own cpt is evaluated and the three
variants run as above; per variant x domain the mean, std, min-max and each seed's value (with the
forgetting's paired bootstrap CI), and per seed the target "replay forgets less than no replay"
(mean forgetting over the old domains), go to artifacts/bench/quality_seeds.json.

    python bench/quality.py --seed-roots /work/seeds/s1234,/work/seeds/s1235,/work/seeds/s1236
    python bench/quality.py --render-seeds      # the README table from artifacts/bench/quality_seeds.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from posttrain.scoring.report import read_report  # noqa: I001 - after the sys.path set-up above
from bench.common import (
    PYTHON,
    RESULTS,
    clone_project,
    commit,
    dvc,
    full_root,
    load_result,
    log,
    read_json,
    set_overrides,
    set_params,
    stages_run,
    timed,
    write_result,
)  # fmt: skip

OLD_DOMAINS = ("add", "rev")

NEW_DOMAIN = "sub"

# name -> params changed from the recipe (cpt.schedule is replaced as a whole: same budget).
SCHEDULES = {
    "cosine": {"name": "cosine", "warmup_fraction": 0.05, "min_lr_ratio": 0.0},
    "wsd": {"name": "wsd", "warmup_fraction": 0.05, "decay_fraction": 0.2, "min_lr_ratio": 0.0},
    "constant_cooldown": {
        "name": "constant_cooldown",
        "warmup_fraction": 0.05,
        "decay_fraction": 0.2,
        "min_lr_ratio": 0.0,
    },
}


def ladder(root) -> dict[str, Any]:
    evaluation = read_report(root / "artifacts" / "metrics" / "eval.json")
    e2e = load_result("e2e") or {}
    walls = {s: v["wall_seconds"] for s, v in e2e.get("full_run", {}).get("stages", {}).items()}
    rows: dict[str, Any] = {}
    for stage in evaluation.stages:
        scores = evaluation.exact_match(stage)
        rows[stage] = {
            "wall_seconds": walls.get(stage),
            "domains": {
                d: (scores[d].model_dump(include={"mean", "ci_low", "ci_high", "n"}) if d in scores else None)
                for d in evaluation.models[stage].domains
            },  # fmt: skip
            "forgetting": evaluation.models[stage].forgetting,
        }
    samples, confidence, _ = evaluation.bootstrap
    return {
        "stages": rows,
        "confidence": confidence,
        "bootstrap_samples": samples,
        "max_items": evaluation.config.get("max_items"),
        "other_stage_wall_seconds": {s: w for s, w in walls.items() if s not in rows},
    }


def cpt_scores(root) -> dict[str, Any]:
    evaluation = read_report(root / "artifacts" / "metrics" / "eval.json")
    out: dict[str, Any] = {
        stage: {d: s.model_dump() for d, s in evaluation.exact_match(stage).items()} for stage in ("pretrain", "cpt")
    }
    out["forgetting"] = evaluation.models["cpt"].forgetting
    cpt = read_json(root / "artifacts" / "metrics" / "cpt.json")
    out["cpt_train_seconds"] = cpt.get("seconds")
    out["cpt_final_train_loss"] = cpt.get("final_train_loss")
    out["threads"] = cpt.get("threads")
    return out


def variant(source, name: str, updates: dict[str, Any]) -> dict[str, Any]:
    import yaml

    root = clone_project(source, f"ablation-{name}")
    set_params(root, {"evaluate.models": ["pretrain", "cpt"], "tracking.enabled": False})
    commit(root, f"ablation {name}: evaluate pretrain and cpt only, no tracking")
    timed(dvc("status"), root)  # the clone's files have new inodes: let DVC re-read its state first
    ran: list[str] = []
    seconds: dict[str, float] = {}
    overrides: list[str] = []
    if updates:
        overrides = set_overrides(yaml.safe_load((root / "params.yaml").read_text()), updates)
        done = timed(
            dvc("exp", "run", "-n", f"ablation-{name}", *[a for o in overrides for a in ("-S", o)], "cpt"), root
        )
        ran += stages_run(done["stdout"])
        seconds["dvc_exp_run"] = done["seconds"]
    # The evaluate module directly (what dvc.yaml's cmd runs): its DVC deps name every model folder,
    # and sft..grpo were not retrained for this variant. No updates: the run's own cpt.
    done = timed([PYTHON, "-m", "stages.evaluate"], root)
    ran.append("evaluate")
    seconds["evaluate"] = done["seconds"]
    scores = cpt_scores(root)
    pre, cpt = scores["pretrain"], scores["cpt"]
    summary = {
        "forgetting_old": {d: round(pre[d]["mean"] - cpt[d]["mean"], 4) for d in OLD_DOMAINS if d in cpt},
        "forgetting_ci": {d: scores["forgetting"].get(d) for d in OLD_DOMAINS},
        "gain_new": round(cpt[NEW_DOMAIN]["mean"] - pre[NEW_DOMAIN]["mean"], 4),
        "em_cpt": {d: v["mean"] for d, v in cpt.items()},
    }
    log(f"  {name}: forgetting {summary['forgetting_old']}, gain on {NEW_DOMAIN} {summary['gain_new']}")
    return {"root": str(root), "params": updates, "dvc_exp_run_set": overrides, "stages_ran": ran, "seconds": seconds,
            "scores": scores, **summary}  # fmt: skip


def run_ablations(source: Path, only: str | None) -> dict[str, Any]:
    import yaml

    recipe = yaml.safe_load((source / "params.yaml").read_text())
    wanted = set(only.split(",")) if only else None
    runs: dict[str, Any] = {}
    if wanted is not None and "recipe" in wanted:
        runs["recipe"] = variant(source, "recipe", {})
    if wanted is None or "no_replay" in wanted:
        runs["no_replay"] = variant(source, "no_replay", {"mixtures.cpt.replay": None})
    for name, schedule in SCHEDULES.items():
        if wanted is not None and name not in wanted:
            continue
        if recipe["cpt"]["schedule"] == schedule:
            continue  # the recipe's own cpt is this variant
        runs[name] = variant(source, name, {"cpt.schedule": schedule})
    return runs


def spread(values: dict[str, float]) -> dict[str, Any]:
    numbers = list(values.values())
    return {
        "mean": round(statistics.fmean(numbers), 4),
        "std": round(statistics.stdev(numbers), 4) if len(numbers) > 1 else None,
        "min": min(numbers),
        "max": max(numbers),
        "per_seed": values,
    }


def seed_of(root: Path) -> int:
    import yaml

    return int(yaml.safe_load((root / "params.yaml").read_text())["seed"])


def run_seed_ablations(roots: list[Path]) -> dict[str, Any]:
    """The recipe's cpt and the three variants in each seed's root; spread over seeds; targets per seed."""
    per_seed: dict[str, dict[str, Any]] = {}
    for root in roots:
        seed = str(seed_of(root))
        log(f"seed {seed} ({root})")
        runs = {"recipe": variant(root, f"s{seed}-recipe", {})}
        runs.update({name: v for name, v in run_ablations(root, None).items()})
        per_seed[seed] = runs
    names = list(next(iter(per_seed.values())))
    variants: dict[str, Any] = {}
    for name in names:
        rows = {seed: runs[name] for seed, runs in per_seed.items()}
        domains = list(next(iter(rows.values()))["em_cpt"])
        variants[name] = {
            "em_cpt": {d: spread({s: r["em_cpt"][d] for s, r in rows.items()}) for d in domains},
            "forgetting_old": {d: spread({s: r["forgetting_old"][d] for s, r in rows.items()}) for d in OLD_DOMAINS},
            "forgetting_ci": {s: r["forgetting_ci"] for s, r in rows.items()},
            "gain_new": spread({s: r["gain_new"] for s, r in rows.items()}),
            "pretrain_em": {s: {d: v["mean"] for d, v in r["scores"]["pretrain"].items()} for s, r in rows.items()},
            "cpt_train_seconds": {s: r["scores"]["cpt_train_seconds"] for s, r in rows.items()},
            "params": next(iter(rows.values()))["params"],
        }
    targets = {}
    for seed, runs in per_seed.items():
        with_replay = statistics.fmean(runs["recipe"]["forgetting_old"].values())
        without = statistics.fmean(runs["no_replay"]["forgetting_old"].values())
        targets[seed] = {
            "passed": with_replay < without,
            "detail": f"mean forgetting on {'+'.join(OLD_DOMAINS)}: replay {with_replay:.3f} vs no replay {without:.3f}",
        }
    return {"seeds": list(per_seed), "roots": [str(r) for r in roots], "variants": variants,
            "replay_forgets_less": targets, "schedules": SCHEDULES, "runs": per_seed}  # fmt: skip


VARIANT_NAMES = {"recipe": "recipe (WSD, replay 25%)", "no_replay": "WSD, no replay",
                 "cosine": "cosine re-warm, replay", "constant_cooldown": "constant + cool-down, replay"}  # fmt: skip


def render_seed_ablations(result: dict[str, Any]) -> str:
    """Markdown: per variant, mean ± std [min, max] over seeds of EM and forgetting; the replay target per seed."""

    def cell(entry: dict[str, Any]) -> str:
        std = f" ± {entry['std']:.3f}" if entry.get("std") is not None else ""
        return f"{entry['mean']:.3f}{std} [{entry['min']:.3f}, {entry['max']:.3f}]"

    lines = [
        "| cpt variant | EM add | EM rev | EM sub (new) | forgetting add | forgetting rev | gain sub |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        em, fo = v["em_cpt"], v["forgetting_old"]
        lines.append(
            f"| {VARIANT_NAMES.get(name, name)} | {cell(em['add'])} | {cell(em['rev'])} | {cell(em[NEW_DOMAIN])} | "
            f"{cell(fo['add'])} | {cell(fo['rev'])} | {cell(v['gain_new'])} |"
        )
    lines += ["", "Per seed (forgetting on add / rev with its paired 95% bootstrap CI; gain on sub):", ""]
    seeds = result["seeds"]
    lines += ["| cpt variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, v in result["variants"].items():
        cells = []
        for seed in seeds:
            ci = v["forgetting_ci"][seed]
            parts = [
                f"{v['forgetting_old'][d]['per_seed'][seed]:.3f} [{ci[d]['ci_low']:.3f}, {ci[d]['ci_high']:.3f}]"
                if ci.get(d) else f"{v['forgetting_old'][d]['per_seed'][seed]:.3f}"
                for d in OLD_DOMAINS
            ]  # fmt: skip
            cells.append(" / ".join(parts) + f"; {v['gain_new']['per_seed'][seed]:.3f}")
        lines.append(f"| {VARIANT_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    lines += ["", 'Target "replay forgets less than no replay" (mean forgetting over add and rev):', ""]
    for seed, t in result["replay_forgets_less"].items():
        lines.append(f"- seed {seed}: {'pass' if t['passed'] else 'FAIL'} ({t['detail']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--only-ablations", default=None, help="comma-separated: no_replay,cosine,constant_cooldown")
    parser.add_argument("--ablations-only", action="store_true",
                        help="run the ablations only (from --source, e.g. while the e2e run is still going) into "
                             "ablations.json; a later run without it takes them from there")  # fmt: skip
    parser.add_argument("--source", type=Path, default=None, help="run to clone (default: the e2e run's)")
    parser.add_argument("--seed-roots", default=None, help="comma-separated finished runs, one per seed")
    parser.add_argument("--render-seeds", action="store_true", help="print the multi-seed table and exit")
    args = parser.parse_args(argv)
    if args.render_seeds:
        result = read_json(RESULTS / "quality_seeds.json")
        print(render_seed_ablations(result))
        return result
    if args.seed_roots:
        roots = [Path(r).resolve() for r in args.seed_roots.split(",") if r]
        result = run_seed_ablations(roots)
        write_result("quality_seeds", result)
        return result
    source = args.source or full_root()
    import yaml

    if args.ablations_only:
        runs = run_ablations(source, args.only_ablations)
        name = "ablations" if not args.only_ablations else "ablations-" + args.only_ablations.replace(",", "-")
        return write_result(name, {"source": str(source), "ablations": runs, "schedules": SCHEDULES})

    recipe = yaml.safe_load((source / "params.yaml").read_text())
    finished = (source / "artifacts" / "metrics" / "eval.json").is_file()
    result: dict[str, Any] = {"source": str(source), "ladder": ladder(source) if finished else None}
    runs: dict[str, Any] = {}
    for path in sorted(RESULTS.glob("ablations*.json")):  # from --ablations-only runs of this source
        earlier = read_json(path)
        if earlier.get("source") == str(source):
            runs.update(earlier["ablations"])
    if not args.skip_ablations:
        runs.update(run_ablations(source, args.only_ablations))
    if finished:
        # The recipe's own cpt (WSD, with replay) from the end-to-end run: evaluated on the same items,
        # and stages are deterministic for a seed, so it is the baseline of both ablations.
        base = cpt_scores(source)
        pre, cpt = base["pretrain"], base["cpt"]
        result["recipe_cpt"] = {
            "scores": base,
            "forgetting_old": {d: round(pre[d]["mean"] - cpt[d]["mean"], 4) for d in OLD_DOMAINS if d in cpt},
            "forgetting_ci": {d: base["forgetting"].get(d) for d in OLD_DOMAINS},
            "gain_new": round(cpt[NEW_DOMAIN]["mean"] - pre[NEW_DOMAIN]["mean"], 4),
            "em_cpt": {d: v["mean"] for d, v in cpt.items()},
        }
    elif "recipe" in runs:
        result["recipe_cpt"] = runs.pop("recipe")
    result["recipe_cpt_params"] = {"cpt.schedule": recipe["cpt"]["schedule"],
                                   "mixtures.cpt.replay": recipe["mixtures"]["cpt"].get("replay")}  # fmt: skip
    result["ablations"] = runs
    result["schedules"] = SCHEDULES
    write_result("quality", result)
    return result


if __name__ == "__main__":
    main()
