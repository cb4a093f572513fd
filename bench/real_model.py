"""The real-model recipe (configs/real-model.yaml) over seeds: each stage's target before -> after, the
forgetting side, the merge's trade-off curve, and the ablations the claims need (issue 26).

Per seed, from a clean start with the committed code: `git clone` of this repository's HEAD into
`<work>/seed-<s>` (no artifacts, no checkpoints/), the model folder linked in, the recipe copied to
params.yaml with `seed: <s>`, then `posttrain run --no-prefect` (DVC runs every stage). Then the
ablations, each in its own folder of that clone (`ablations/<name>/`), by the clone's own stage
functions (`python bench/real_model.py ablation <name>` run inside the clone):

    cpt_no_replay    cpt without the replayed general text (mixtures.cpt.replay: null), from the same base
    sft_no_cpt       sft from the base instead of the cpt model: what the lore questions get without CPT
    sft_on_chain     SFT from the dpo model on grpo's task (chain, gold worked solutions), scored on the
                     validation items every few steps: forgetting against gain, SFT against RL
    grpo_curriculum  grpo with the UCB difficulty curriculum (grpo.curriculum) instead of uniform sampling

Each seed's figures go to artifacts/bench/real_model/seed-<s>.json (scores from eval.json, stage metrics,
ablations, wall seconds, the machine and its load); the seed's checkpoints, DVC cache and model folders
are deleted afterwards (GBs per seed).

    python bench/real_model.py run --seeds 1 2 3 [--work /tmp/real-model] [--part chain|ablations|all]
    python bench/real_model.py render     # the tables of docs/real-model.md and the trade-off plot
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PYTHON, REPO, RESULTS, log, machine_info, now, project_env, read_json

RECIPE = Path("configs") / "real-model.yaml"
MODEL = REPO / "models" / "smollm2-135m-instruct"
OUT = RESULTS / "real_model"
DOC = REPO / "docs" / "real-model.md"
MARKERS = ("<!-- real-model:start -->", "<!-- real-model:end -->")
PLOT = RESULTS / "real_model_tradeoff.png"
ABLATIONS = ("cpt_no_replay", "sft_no_cpt", "sft_on_chain", "grpo_curriculum")
# What the ablations keep from the eval.json of a run (stage -> domains) and how the series are scored.
EVAL_KEYS = ("exact_match", "perplexity", "loss", "preference")
SFT_ON_CHAIN = {"max_steps": 30, "eval_every": 5}

# --------------------------------------------------------------------------- one seed


def clean_clone(work: Path, seed: int) -> Path:
    """A clone of this repository's HEAD with the recipe as params.yaml (`seed` set) and the model linked."""
    import yaml

    root = work / f"seed-{seed}"
    if root.exists():
        shutil.rmtree(root)
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / MODEL.name).symlink_to(MODEL)
    params = yaml.safe_load((root / RECIPE).read_text())
    params["seed"] = seed
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def env_for(root: Path) -> dict[str, str]:
    # The clone's code, not the checkout the venv was installed from.
    return project_env(root, {"PYTHONPATH": str(root)})


def run_logged(cmd: list[str], root: Path, log_path: Path) -> float:
    """Run `cmd` in `root` with its output in `log_path`; wall seconds. Raises naming the log on failure."""
    started = time.perf_counter()
    with log_path.open("w") as out:
        done = subprocess.run(cmd, cwd=root, env=env_for(root), stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}) after {seconds:.0f} s; see {log_path}")
    return round(seconds, 1)


def eval_scores(report: dict[str, Any]) -> dict[str, Any]:
    """model -> domain -> the eval.json entries the tables use (means with their bootstrap CIs)."""
    return {
        stage: {
            domain: {k: entry.get(k) for k in EVAL_KEYS if entry.get(k) is not None}
            for domain, entry in model["domains"].items()
        }
        for stage, model in report["models"].items()
    }


def stage_metrics(root: Path) -> dict[str, Any]:
    """The training stages' and the merge's own measurements (held-out before/after, no-learning checks)."""
    keep = {
        "cpt": ("seconds", "first_train_loss", "final_train_loss", "val_before", "val_after", "no_learning"),
        "sft": ("seconds", "first_train_loss", "final_train_loss", "val_before", "val_after", "no_learning"),
        "dpo": (
            "seconds",
            "val_before",
            "val_after",
            "preference_accuracy_before",
            "preference_accuracy_after",
            "logp_margin_before",
            "logp_margin_after",
            "reward_margin_after",
            "no_learning",
        ),  # fmt: skip
        "grpo": (
            "seconds",
            "val_before",
            "val_after",
            "greedy_exact_match_before",
            "greedy_exact_match_after",
            "sampled_reward_before",
            "sampled_reward_after",
            "sampled_zero_variance_groups_before",
            "sampled_zero_variance_groups_after",
            "train_reward_first",
            "train_reward_last",
            "no_learning",
            "curriculum_final_probabilities",
        ),  # fmt: skip
        "merge": ("seconds", "weights", "wise_ft"),
    }
    out = {}
    for stage, keys in keep.items():
        path = root / "artifacts" / "metrics" / f"{stage}.json"
        if path.is_file():
            metrics = read_json(path)
            out[stage] = {k: metrics.get(k) for k in keys}
    return out


def run_seed(seed: int, work: Path, part: str) -> dict[str, Any]:
    """`part` chain: clone and run the recipe; ablations: the ablations in that clone (the chain's models must
    still be there); all: both. The seed's JSON is written after each part, heavy files deleted after the last."""

    path = OUT / f"seed-{seed}.json"
    root = work / f"seed-{seed}"
    if part in ("chain", "all"):
        root = clean_clone(work, seed)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        result: dict[str, Any] = {"seed": seed, "commit": commit, "started_at": now(), "machine_start": machine_info()}
        log(f"seed {seed}: posttrain run --no-prefect --no-promote in {root} (commit {commit[:8]})")
        posttrain = str(Path(PYTHON).parent / "posttrain")
        # The stages are measured, not the promotion: its refusal (exit 3) is a verdict, not a failed chain.
        command = [posttrain, "run", "--no-prefect", "--no-promote"]
        result["chain_seconds"] = run_logged(command, root, root / "chain.log")
        write_seed(path, finished_chain(root, result))
    if part in ("ablations", "all"):
        result = read_json(path)
        result["ablations"] = {}
        for name in ABLATIONS:
            log(f"seed {seed}: ablation {name}")
            out = root / "ablations" / f"{name}.json"
            started = machine_info()["load_average"][0]
            seconds = run_logged([PYTHON, "bench/real_model.py", "ablation", name, "--out", str(out)], root,
                                 root / f"ablation-{name}.log")  # fmt: skip
            result["ablations"][name] = {**read_json(out), "seconds": seconds, "load": [started, os.getloadavg()[0]]}
            shutil.rmtree(root / "ablations" / name, ignore_errors=True)
            write_seed(path, result)
        for heavy in ("checkpoints", ".dvc/cache", "artifacts/models"):
            shutil.rmtree(root / heavy, ignore_errors=True)
    return read_json(path)


def finished_chain(root: Path, result: dict[str, Any]) -> dict[str, Any]:
    """`result` with what the finished chain in `root` measured: scores, forgetting, each stage's metrics."""
    import yaml

    result["load_after_chain"] = list(os.getloadavg())
    shutil.rmtree(root / "checkpoints", ignore_errors=True)  # 1.6 GB per saved step
    report = read_json(root / "artifacts" / "metrics" / "eval.json")
    result["eval"], result["forgetting"] = eval_scores(report), report["forgetting"]["forgetting"]
    result["max_items"] = report["config"]["max_items"]
    result["task_domains"] = yaml.safe_load((root / "params.yaml").read_text())["merge"]["wise_ft"]["task_domains"]
    result["stages"] = stage_metrics(root)
    result["finished_at"] = now()
    return result


def collect_seed(seed: int, work: Path, chain_seconds: float) -> None:
    """The seed's JSON from a chain that finished in `work/seed-<seed>` but whose result was not written (the
    script stopped after the run). The machine facts are read now, and the JSON says so."""
    root = work / f"seed-{seed}"
    if not (root / "artifacts" / "metrics" / "eval.json").is_file():
        raise SystemExit(f"{root}: no artifacts/metrics/eval.json; the chain did not finish")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    result: dict[str, Any] = {"seed": seed, "commit": commit, "machine_start": machine_info(),
                              "collected_after_the_run": True, "chain_seconds": chain_seconds}  # fmt: skip
    write_seed(OUT / f"seed-{seed}.json", finished_chain(root, result))


def write_seed(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {path}")


# --------------------------------------------------------------------------- ablations (run inside a clone)


def ablation(name: str, out: Path) -> None:
    """One ablation in `ablations/<name>/` of the finished run in the current folder (its own code)."""
    import yaml

    from posttrain.config import parse_params
    from posttrain.layout import Layout
    from stages import cpt, evaluate, grpo, mix, sft

    root = Path.cwd()
    raw = yaml.safe_load((root / "params.yaml").read_text())
    main = Layout(root)
    work = root / "ablations" / name
    if work.exists():
        shutil.rmtree(work)
    layout = Layout(work)
    shutil.copytree(main.prepared, layout.prepared)

    def model(source: str, slot: str) -> None:
        # The stage reads its parent from a fixed slot: the model wanted is copied there, its lineage intact.
        shutil.copytree(main.model(source), layout.model(slot))

    def scored(models: list[str], domains: list[str]) -> dict[str, Any]:
        raw["evaluate"] = {**raw["evaluate"], "models": models, "domains": domains,
                           "preference_domains": [d for d in raw["evaluate"]["preference_domains"] if d in domains]}  # fmt: skip
        evaluate.run(parse_params(raw), layout)
        return eval_scores(read_json(layout.metrics("eval")))

    result: dict[str, Any] = {"name": name}
    if name == "cpt_no_replay":
        raw["mixtures"]["cpt"]["replay"] = None
        model("pretrain", "pretrain")
        mix.run(parse_params(raw), layout)
        cpt.run(parse_params(raw), layout)
        result["eval"] = scored(["cpt"], ["lore", "chat"])
    elif name == "sft_no_cpt":
        model("pretrain", "cpt")
        shutil.copytree(main.mixture("sft"), layout.mixture("sft"))
        sft.run(parse_params(raw), layout)
        result["eval"] = scored(["sft"], ["lore_qa", "chain", "chat"])
    elif name == "sft_on_chain":
        model("dpo", "cpt")
        steps, every = SFT_ON_CHAIN["max_steps"], SFT_ON_CHAIN["eval_every"]
        batch = raw["sft"]["trainer"]["per_device_train_batch_size"]
        raw["mixtures"]["sft"] = {**raw["mixtures"]["sft"], "weights": {"chain": 1.0}, "total": steps * batch}
        # The items grpo scores itself on: its held-out prompts (chain) and its continual-evaluation domains.
        raw["sft"] = {**raw["sft"], "eval_every": every, "eval_domains": ["chain", *raw["grpo"]["eval_domains"]],
                      "eval_items": raw["grpo"]["eval_items"],
                      "trainer": {**raw["sft"]["trainer"], "max_steps": steps, "save_steps": steps}}  # fmt: skip
        mix.run(parse_params(raw), layout)
        sft.run(parse_params(raw), layout)
        result["series"] = read_json(layout.metrics("sft"))["continual_eval"]
        result["eval"] = scored(["sft"], ["chain", "chat"])
    elif name == "grpo_curriculum":
        model("dpo", "dpo")
        shutil.copytree(main.mixture("grpo"), layout.mixture("grpo"))
        raw["grpo"]["curriculum"] = {"method": "ucb", "arms": "difficulty"}
        grpo.run(parse_params(raw), layout)
        metrics = read_json(layout.metrics("grpo"))
        result["curriculum_final_probabilities"] = metrics.get("curriculum_final_probabilities")
        result["curriculum_pulls"] = metrics.get("curriculum_pulls")
        result["eval"] = scored(["grpo"], ["chain", "chat"])
    else:
        raise SystemExit(f"unknown ablation {name!r}; expected one of {ABLATIONS}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


# --------------------------------------------------------------------------- rendering

# Two-sided 95% Student t quantiles by degrees of freedom (the CI of a mean over n seeds uses n - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and the 95% t-interval of the mean over seeds."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    half = T95.get(n - 1, 1.96) * std / math.sqrt(n) if std is not None else None
    return {"mean": mean, "std": std, "ci": [mean - half, mean + half] if half is not None else None, "n": n,
            "values": values}  # fmt: skip


def fmt(s: dict[str, Any], digits: int = 3) -> str:
    if s["std"] is None:
        return f"{s['mean']:.{digits}f} (1 seed)"
    low, high = s["ci"]
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def value(run: dict[str, Any], stage: str, domain: str, metric: str, key: str = "mean") -> float | None:
    entry = ((run.get("eval") or {}).get(stage) or {}).get(domain, {}).get(metric)
    if entry is None:
        return None
    if metric == "preference":
        entry = entry["accuracy"]
    return entry.get(key)


def collect(runs: list[dict[str, Any]], stage: str, domain: str, metric: str) -> dict[str, Any] | None:
    values = [value(r, stage, domain, metric) for r in runs]
    return stats([v for v in values if v is not None]) if all(v is not None for v in values) and values else None


def delta(runs: list[dict[str, Any]], before: tuple[str, ...], after: tuple[str, ...]) -> dict[str, Any] | None:
    pairs = [(value(r, *before), value(r, *after)) for r in runs]
    if not pairs or any(a is None or b is None for a, b in pairs):
        return None
    return stats([b - a for a, b in pairs])


def row(runs: list[dict[str, Any]], label: str, metric: str, domain: str, before: str, after: str,
        digits: int = 3, before_runs: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    """One table row: before -> after and the change, each mean ± std [95% CI] over seeds."""
    source = before_runs or runs
    b, a = collect(source, before, domain, metric), collect(runs, after, domain, metric)
    if b is None or a is None:
        return f"| {label} | {before} -> {after} | not measured | | |"
    d = stats([x - y for x, y in zip(a["values"], b["values"], strict=True)])
    return f"| {label} | {before} -> {after} | {fmt(b, digits)} | {fmt(a, digits)} | {fmt(d, digits)} |"


def ablation_runs(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r["ablations"][name] for r in runs if name in (r.get("ablations") or {})]


HEADER = "| measure | models | before (mean ± std [95% CI]) | after | change |\n|---|---|---|---|---|"


def render(runs: list[dict[str, Any]]) -> str:
    seeds = [r["seed"] for r in runs]
    machine = runs[0]["machine_start"]
    loads = [
        f"seed {r['seed']}: {r['machine_start']['load_average'][0]:.1f} -> {r['load_after_chain'][0]:.1f}"
        + (" (read after the run, `collect`)" if r.get("collected_after_the_run") else "")
        for r in runs
    ]
    lines = [
        f"Seeds {seeds}; committed code {sorted({r['commit'][:8] for r in runs})}, each from a clean clone "
        f"(`python bench/real_model.py run`); {machine['cpu_model']}, {machine['cores']} cores, no GPU, "
        f"torch {machine['versions']['torch']}. The machine was shared: 1-minute load average at the start -> "
        f"end of each chain: {'; '.join(loads)}. Whole chain (prepare to evaluate, DVC): "
        + ", ".join(f"seed {r['seed']} {r['chain_seconds'] / 60:.1f} min" for r in runs)
        + ". Mean ± sample std over seeds [95% t-interval of the mean]; each model scored on the first "
        f"{runs[0]['max_items']} test items per domain.",
        "",
    ]
    nr, nc, soc, cur = (ablation_runs(runs, n) for n in ABLATIONS)
    with_ablations = len(nr) == len(runs)

    lines += ["**CPT** (target: lower new-domain perplexity; forgetting: general-chat perplexity)", "", HEADER,
              row(runs, "lore perplexity (test passages)", "perplexity", "lore", "pretrain", "cpt", 2),
              row(runs, "general-chat perplexity", "perplexity", "chat", "pretrain", "cpt", 2)]  # fmt: skip
    if with_ablations:
        lines += [row(nr, "lore perplexity, no replay", "perplexity", "lore", "pretrain", "cpt", 2, runs),
                  row(nr, "general-chat perplexity, no replay", "perplexity", "chat", "pretrain", "cpt", 2, runs)]  # fmt: skip
    lines += ["", "**SFT** (target: chain and lore-question exact match; the lore questions are held out: only "
              "CPT's passages state their facts)", "", HEADER,
              row(runs, "lore questions exact match", "exact_match", "lore_qa", "cpt", "sft"),
              row(runs, "chain exact match", "exact_match", "chain", "cpt", "sft"),
              row(runs, "general-chat perplexity", "perplexity", "chat", "cpt", "sft", 2)]  # fmt: skip
    if with_ablations:
        lines += [row(ablation_runs(runs, "sft_no_cpt"), "lore questions, SFT without CPT (control)",
                      "exact_match", "lore_qa", "cpt", "sft", 3, runs)]  # fmt: skip
    lines += ["", "**DPO** (target: preference accuracy on held-out 3-digit pairs, correct sum vs a plausible wrong "
              "one)", "", HEADER,
              row(runs, "add3 preference accuracy (test pairs)", "preference", "add3", "sft", "dpo"),
              row(runs, "add3 exact match", "exact_match", "add3", "sft", "dpo"),
              row(runs, "general-chat perplexity", "perplexity", "chat", "sft", "dpo", 2)]  # fmt: skip
    lines += ["", "**GRPO** (target: chain exact match +5 points over dpo, beyond dpo's CI and the seed spread)", "",
              HEADER, row(runs, "chain exact match", "exact_match", "chain", "dpo", "grpo"),
              row(runs, "general-chat perplexity", "perplexity", "chat", "dpo", "grpo", 2)]  # fmt: skip
    lines += ["", grpo_target(runs), ""]
    lines += forgetting_table(runs, soc)
    lines += merge_table(runs)
    if with_ablations:
        lines += ["", "**Seed method tried again: GRPO difficulty curriculum (UCB over t3/t4) vs uniform**", "",
                  HEADER, row(cur, "chain exact match, curriculum", "exact_match", "chain", "dpo", "grpo", 3, runs),
                  row(runs, "chain exact match, uniform (the recipe)", "exact_match", "chain", "dpo", "grpo")]  # fmt: skip
        diffs = [value(c, "grpo", "chain", "exact_match") - value(r, "grpo", "chain", "exact_match")
                 for c, r in zip(cur, runs, strict=True)]  # fmt: skip
        lines += ["", f"Curriculum minus uniform, chain exact match: {fmt(stats(diffs))} (per seed "
                  + ", ".join(f"{d:+.3f}" for d in diffs) + ")."]  # fmt: skip
    return "\n".join(lines)


def grpo_target(runs: list[dict[str, Any]]) -> str:
    parent = collect(runs, "dpo", "chain", "exact_match")
    per_seed = []
    for r in runs:
        child, ci_high = value(r, "grpo", "chain", "exact_match"), value(r, "dpo", "chain", "exact_match", "ci_high")
        gain = child - value(r, "dpo", "chain", "exact_match")
        per_seed.append((r["seed"], gain, child > ci_high))
    gains = stats([g for _, g, _ in per_seed])
    spread = parent["std"] or 0.0
    met = gains["mean"] >= 0.05 and all(b for _, _, b in per_seed) and gains["mean"] > spread
    detail = "; ".join(f"seed {s}: {g:+.3f}, above dpo's CI: {'yes' if b else 'no'}" for s, g, b in per_seed)
    return (f"GRPO target {'met' if met else 'not met'}: gain {fmt(gains)} (needs >= 0.050), dpo's seed spread (std) "
            f"{spread:.3f}; {detail}.")  # fmt: skip


def forgetting_table(runs: list[dict[str, Any]], soc: list[dict[str, Any]]) -> list[str]:
    """Gain on each stage's own target against what it cost: general-chat perplexity and the lore questions."""
    lines = ["**Forgetting against gain** (each stage against its parent; general-chat perplexity up = forgotten)", "",
             "| stage | gain on its target | Δ general-chat perplexity | Δ lore questions exact match |",
             "|---|---|---|---|"]  # fmt: skip
    targets = {"sft": ("chain", "exact_match", "cpt"), "dpo": ("add3", "preference", "sft"),
               "grpo": ("chain", "exact_match", "dpo")}  # fmt: skip
    for stage, (domain, metric, parent) in targets.items():
        gain = delta(runs, (parent, domain, metric), (stage, domain, metric))
        chat = delta(runs, (parent, "chat", "perplexity"), (stage, "chat", "perplexity"))
        lore = delta(runs, (parent, "lore_qa", "exact_match"), (stage, "lore_qa", "exact_match"))
        label = f"{domain} {'preference accuracy' if metric == 'preference' else 'exact match'}"
        lines.append(f"| {stage} ({label}) | {fmt(gain) if gain else '-'} | {fmt(chat, 2) if chat else '-'} | "
                     f"{fmt(lore) if lore else '-'} |")  # fmt: skip
    if soc:
        lines += ["", rl_vs_sft(runs, soc)]
    return lines + [""]


def rl_vs_sft(runs: list[dict[str, Any]], soc: list[dict[str, Any]]) -> str:
    """SFT on grpo's task from the same dpo model, scored on the same validation items every few steps: its
    general-chat loss change at the chain gain GRPO reached (linear between the two nearest points)."""
    parts = []
    for run, sft_run in zip(runs, soc, strict=True):
        grpo = run["stages"]["grpo"]
        gain = grpo["greedy_exact_match_after"] - grpo["greedy_exact_match_before"]
        cost = grpo["val_after"]["chat"]["loss"] - grpo["val_before"]["chat"]["loss"]
        series = sorted({r["step"] for r in sft_run["series"]})
        at = {s: {r["domain"]: r for r in sft_run["series"] if r["step"] == s} for s in series}
        base_em, base_loss = at[0]["chain"]["exact_match"], at[0]["chat"]["loss"]
        points = [(at[s]["chain"]["exact_match"] - base_em, at[s]["chat"]["loss"] - base_loss) for s in series]
        matched = None
        for (g0, c0), (g1, c1) in zip(points, points[1:], strict=False):
            if g0 <= gain <= g1 and g1 > g0:
                matched = c0 + (c1 - c0) * (gain - g0) / (g1 - g0)
                break
        shown = "not reached" if matched is None else f"{matched:+.4f}"
        parts.append(f"seed {run['seed']}: GRPO gain {gain:+.3f} for chat loss {cost:+.4f}; SFT at that gain {shown}"
                     f" (SFT after {series[-1]} steps: gain {points[-1][0]:+.3f}, chat loss {points[-1][1]:+.4f})")  # fmt: skip
    return ("RL against SFT at equal gain (validation items, chain exact match and general-chat loss, "
            f"SFT on chain's gold solutions from the same dpo model, scored every {SFT_ON_CHAIN['eval_every']} "
            "steps): " + "; ".join(parts) + ".")  # fmt: skip


def merge_table(runs: list[dict[str, Any]]) -> list[str]:
    """WiSE-FT's choice per seed and the issue's target on the test split: chat-perplexity loss recovered and
    task gain kept, task = mean exact match over merge.wise_ft.task_domains."""
    lines = ["**Merge: WiSE-FT of grpo with the base, alpha chosen on validation items**", "",
             "| seed | alpha | task exact match base / grpo / merge | chat perplexity base / grpo / merge | "
             "chat-perplexity loss recovered (target ≥ 50%) | task gain kept (target ≥ 90%) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    recovered, kept = [], []
    for r in runs:
        choice = r["stages"]["merge"]["wise_ft"]
        domains = r["task_domains"]
        task = {
            s: statistics.fmean(value(r, s, d, "exact_match") for d in domains) for s in ("pretrain", "grpo", "merge")
        }
        ppl = {s: value(r, s, "chat", "perplexity") for s in ("pretrain", "grpo", "merge")}
        rec = (ppl["grpo"] - ppl["merge"]) / (ppl["grpo"] - ppl["pretrain"]) if ppl["grpo"] != ppl["pretrain"] else None
        keep = (
            (task["merge"] - task["pretrain"]) / (task["grpo"] - task["pretrain"])
            if task["grpo"] != task["pretrain"]
            else None
        )
        recovered.append(rec)
        kept.append(keep)
        lines.append(f"| {r['seed']} | {choice['alpha']:g} | {task['pretrain']:.3f} / {task['grpo']:.3f} / "
                     f"{task['merge']:.3f} | {ppl['pretrain']:.2f} / {ppl['grpo']:.2f} / {ppl['merge']:.2f} | "
                     f"{'-' if rec is None else f'{rec:.0%}'} | {'-' if keep is None else f'{keep:.0%}'} |")  # fmt: skip
    if all(v is not None for v in recovered + kept):
        met = statistics.fmean(recovered) >= 0.5 and statistics.fmean(kept) >= 0.9
        lines += ["", f"Mean over seeds: recovered {statistics.fmean(recovered):.0%}, kept "
                  f"{statistics.fmean(kept):.0%}: target {'met' if met else 'not met'}. The trade-off curve "
                  f"(validation, each seed): `{PLOT.relative_to(REPO)}`."]  # fmt: skip
    return lines


def render_all() -> None:
    from posttrain.scoring.plots import plot_tradeoff

    runs = [read_json(p) for p in sorted(OUT.glob("seed-*.json"))]
    if not runs:
        raise SystemExit(f"no results in {OUT}; run `python bench/real_model.py run --seeds ...` first")
    curves = {f"seed {r['seed']}": r["stages"]["merge"]["wise_ft"]["curve"] for r in runs if r["stages"].get("merge")}
    chosen = {f"seed {r['seed']}": r["stages"]["merge"]["wise_ft"]["alpha"] for r in runs if r["stages"].get("merge")}
    plot_tradeoff(curves, PLOT, chosen=chosen, title="WiSE-FT (grpo with the base): validation task exact match "
                  "against general-chat perplexity")  # fmt: skip
    table = render(runs)
    text = DOC.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--seeds", type=int, nargs="+", required=True)
    run.add_argument("--work", type=Path, default=Path("/tmp/real-model"))
    run.add_argument("--part", choices=("chain", "ablations", "all"), default="all")
    one = sub.add_parser("ablation")
    one.add_argument("name", choices=ABLATIONS)
    one.add_argument("--out", type=Path, required=True)
    collect = sub.add_parser("collect", help="write a seed's JSON from its finished chain (no run)")
    collect.add_argument("--seed", type=int, required=True)
    collect.add_argument("--work", type=Path, default=Path("/tmp/real-model"))
    collect.add_argument("--chain-seconds", type=float, required=True, help="the chain's wall time, from its log")
    sub.add_parser("render")
    args = parser.parse_args(argv)
    if args.command == "run":
        for seed in args.seeds:
            run_seed(seed, args.work, args.part)
    elif args.command == "collect":
        collect_seed(args.seed, args.work, args.chain_seconds)
    elif args.command == "ablation":
        ablation(args.name, args.out)
    else:
        render_all()


if __name__ == "__main__":
    main()
