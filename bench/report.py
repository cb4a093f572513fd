"""Every table of figures in README.md and docs/*.md, rendered from the committed JSON it reports.

A table lives between two markers in a Markdown file:

    <!-- table:e2e -->
    ...rendered, never edited by hand...
    <!-- /table:e2e -->

`TABLES` maps each name to the JSON it reads and the function that renders it; each rendering starts
with one line naming its source file, the machine, the date and the code commit it came from.

    python bench/report.py              rewrite every table in README.md and docs/*.md
    python bench/report.py --check      exit 1 naming each table that differs from its JSON (CI runs it)
    python bench/report.py --print NAME print one table
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import adaptive_compare, engines_cpu, gpu_check, merge_compare, quality, seeds_report, team_mode  # noqa: I001
from bench.common import REPO, RESULTS

MARKER = re.compile(r"<!-- table:([a-z0-9_-]+) -->\n(.*?)<!-- /table:\1 -->", re.S)
SEEDS = REPO / "artifacts" / "metrics" / "seeds.json"


# --------------------------------------------------------------------------- formatting


def f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def met(flag: Any) -> str:
    return "met" if flag else "**missed**"


def median_of(repeats: list[dict[str, Any]], side: str, key: str) -> float:
    """Median of one figure (`key`) of one side (`bare`, `dvc`, `stage`, ...) over the repetitions."""
    return statistics.median(r[side][key] for r in repeats)


def em(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "–"
    return f"{cell['mean']:.3f} [{cell['ci_low']:.3f}, {cell['ci_high']:.3f}]"


# --------------------------------------------------------------------------- provenance


def committed_in(path: Path) -> str | None:
    """The commit that last wrote `path` (a result that does not record the code it measured)."""
    done = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", str(path.relative_to(REPO))], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip() or None


def source_line(path: Path, data: dict[str, Any]) -> str:
    """`artifacts/bench/x.json`: measured <date> on <machine>, code <commit>."""
    machine = data.get("machine") or {}
    when = data.get("measured_at") or data.get("finished") or data.get("started") or "date not recorded"
    where = machine.get("cpu_model") or "machine not recorded"
    if machine.get("cores"):
        where += f", {machine['cores']} cores"
    gpu = (data.get("gpu") or {}).get("name") or machine.get("gpu")
    if isinstance(gpu, str) and not gpu.startswith("none"):
        where += f", {gpu}"
    code = data.get("code_commit") or data.get("commit")
    code_text = f"code {code}" if code else f"results committed in {committed_in(path) or 'an uncommitted file'}"
    return f"*Source: `{path.relative_to(REPO)}`, measured {when} on {where}; {code_text}.*"


# --------------------------------------------------------------------------- the tables


def e2e_table(e2e: dict[str, Any]) -> list[str]:
    run = e2e["full_run"]
    threads = sorted({s.get("threads") for s in run["stages"].values() if s.get("threads")})
    lines = [
        f"Total **{run['total_seconds']:.0f} s** ({run['total_seconds'] / 60:.1f} min) for {len(run['stages'])} stages; "
        f"torch threads {threads}; nothing left to run afterwards: {f(not run['left_to_run_after'])}; load average "
        f"at the end {', '.join(f'{x:.1f}' for x in e2e['machine']['load_average'])}.",
        "",
        "| stage | wall s (`dvc repro --single-item`) | inside the stage function s | trainer.train() s | "
        "outside the stage function s (process start, imports, DVC, MLflow) |",
        "|---|---:|---:|---:|---:|",
    ]
    trainer = e2e.get("trainer_metrics") or {}
    for stage, row in run["stages"].items():
        inner = row.get("stage_seconds")
        train = trainer.get(stage, {}).get("seconds")
        outside = row["wall_seconds"] - inner if inner is not None else None
        lines.append(f"| {stage} | {row['wall_seconds']:.1f} | {f(inner, 1)} | {f(train, 1)} | {f(outside, 1)} |")
    setup = e2e.get("setup")
    if setup:
        total = run["total_seconds"] + setup["seconds"]
        lines += [
            "",
            f"Set-up (`bash scripts/setup.sh`, fresh venv, pip's download cache warm): {setup['seconds']:.0f} s "
            f"(exit {setup['returncode']}); end to end with set-up: {total:.0f} s ({total / 60:.1f} min).",
        ]
    return lines


def throughput_table(e2e: dict[str, Any]) -> list[str]:
    lines = [
        "| stage | steps | trainer.train() s | of which continual eval s | steps/s | tokens/s | peak RSS MB | threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, m in (e2e.get("trainer_metrics") or {}).items():
        lines.append(
            f"| {stage} | {f(m.get('steps'))} | {f(m.get('seconds'), 1)} | {f(m.get('eval_seconds'), 1)} | "
            f"{f(m.get('steps_per_second'))} | {f(m.get('tokens_per_second'), 0)} | {f(m.get('peak_rss_mb'), 0)} | "
            f"{f(m.get('threads'))} |"
        )
    return [*lines, "", "Rates are over training alone: `trainer.train()` minus the continual evaluation inside it."]


def against_bare_table(t: dict[str, Any]) -> list[str]:
    """Stage against the bare TRL script of the same configuration (bench/throughput.py)."""
    target = t.get("target_ratio", 0.95)
    lines = [
        f"{len(next(iter(t['stages'].values()))['repeats'])} repetitions side by side, medians; target: stage "
        f"tokens/s ≥ {target} × bare.",
        "",
        f"| stage | steps | tokens/s bare | tokens/s stage | ratio (target ≥ {target}) | ratio per repetition | "
        "peak RSS MB bare / stage | same final loss |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for stage, entry in t["stages"].items():
        sm = entry["summary"]
        med = functools.partial(median_of, entry["repeats"])
        ratios = sm.get("tokens_per_second_ratios") or [
            r["stage"]["tokens_per_second"] / r["bare"]["tokens_per_second"] for r in entry["repeats"]
        ]
        lines.append(
            f"| {stage} | {entry['max_steps']} | {med('bare', 'tokens_per_second'):.1f} | "
            f"{med('stage', 'tokens_per_second'):.1f} | **{sm['tokens_per_second_ratio_median']:.3f}** "
            f"({met(sm['tokens_per_second_ratio_median'] >= target)}) | {', '.join(f'{x:.3f}' for x in ratios)} | "
            f"{med('bare', 'peak_rss_mb'):.0f} / {med('stage', 'peak_rss_mb'):.0f} | {f(sm['identical_final_loss'])} |"
        )
    return lines


OVERHEAD_MODES = {
    "dvc": "`dvc repro --single-item sft`",
    "flow": "flow, temporary Prefect server (`posttrain run --stages sft`, no PREFECT_API_URL)",
    "flow_server": "flow, running Prefect server (PREFECT_API_URL)",
}


def overhead_table(o: dict[str, Any]) -> list[str]:
    lines = [
        "| threads | steps | run as | wall s | ratio to bare (target ≤ 1.10) | added s | tokens/s | RSS MB | final loss |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for threads, entry in o["by_threads"].items():
        s = entry["summary"]
        med = functools.partial(median_of, entry["repeats"])
        lines.append(
            f"| {threads} | {entry['max_steps']} | bare TRL script | {med('bare', 'wall_seconds'):.1f} | 1 | 0 | "
            f"{med('bare', 'tokens_per_second'):.0f} | {med('bare', 'peak_rss_mb'):.0f} | "
            f"{med('bare', 'final_train_loss'):.6f} |"
        )
        for mode, label in OVERHEAD_MODES.items():
            if mode not in s:
                continue
            m = s[mode]
            lines.append(
                f"| {threads} | {entry['max_steps']} | {label} | {med(mode, 'wall_seconds'):.1f} | "
                f"{m['wall_ratio_median']:.3f} ({met(m['ratio_target_met'])}; each: "
                f"{', '.join(f'{x:.2f}' for x in m['wall_ratios'])}) | {m['added_seconds_median']:.1f} | "
                f"{med(mode, 'tokens_per_second'):.0f} ({m['tokens_per_second_ratio_median']:.3f}×) | "
                f"{med(mode, 'peak_rss_mb'):.0f} | {med(mode, 'final_train_loss'):.6f} |"
            )
    first = next(iter(o["by_threads"].values()))
    same = all(e["summary"]["identical_final_loss"] for e in o["by_threads"].values())
    return [
        *lines,
        "",
        f"{len(first['repeats'])} repetitions side by side (bare, then each way of running the stage, in turn); "
        f"medians of the per-repetition ratios; same final loss in every run: {f(same)}.",
    ]


def cache_table(c: dict[str, Any]) -> list[str]:
    r, fl, g = c["no_change_dvc_repro"], c["no_change_flow"], c["grpo_change"]
    return [
        "| what | seconds (median) | target | |",
        "|---|---:|---:|---|",
        f"| no-change `dvc repro` | {r['median_seconds']:.2f} | ≤ 3 | {met(r['target_met'])} |",
        f"| no-change `dvc status` | {c['dvc_status_seconds']['median_seconds']:.2f} | | |",
        f"| no-change flow (`posttrain run`) | {fl['median_seconds']:.2f} | ≤ 10 | {met(fl['target_met'])} |",
        f"| no-change `posttrain run --no-prefect` | {c['no_change_no_prefect_seconds']['median_seconds']:.2f} | | |",
        "",
        f"`{g.get('command') or g['changed']}`: DVC ran {', '.join(g['stages_ran']) or 'nothing'}, exactly grpo and its "
        f"descendants: {f(g['exact'])}.",
    ]


def startup_table(s: dict[str, Any]) -> list[str]:
    lines = [
        f"`python -c pass`: {s['python_startup']['median_seconds']:.2f} s. CLI: "
        + ", ".join(f"`{k}` {v['median_seconds']:.2f} s" for k, v in s["cli"].items())
        + f"; heavy modules the CLI imports: {', '.join(s['heavy_modules_imported_by_cli']) or 'none'}.",
        "",
        "| import | seconds | | import | seconds |",
        "|---|---:|---|---|---:|",
    ]
    left = [(f"stages.{k}", v["median_seconds"]) for k, v in s["stage_modules"].items()]
    right = [(k, v["median_seconds"]) for k, v in s["libraries"].items()]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ("", None)
        b = right[i] if i < len(right) else ("", None)
        lines.append(f"| {a[0]} | {f(a[1])} | | {b[0]} | {f(b[1])} |")
    return lines


def gpu_check_table(g: dict[str, Any]) -> list[str]:
    if g.get("mode") == "gpu":
        return [gpu_check.render(g)]
    stages = g.get("stages", {})
    ok = [s for s, e in stages.items() if e.get("stage") and e.get("bare") and e.get("same_final_loss")]
    return [
        f"**Not run on a GPU yet: no GPU figure (MFU, tokens/s, memory) is measured.** Its `--cpu-smoke` run (the same "
        f"code at toy size on CPU) ran {', '.join(ok) or 'no stage'} against the bare TRL script with identical final "
        f"losses; FSDP2 at world size 1: {'ok' if (g.get('fsdp') or {}).get('ok') else 'not ok'}."
    ]


def gpu_recipe_table(g: dict[str, Any]) -> list[str]:
    """A recipe run stage by stage on a GPU (bench/gpu_recipe.py)."""
    lines = [
        "| stage | wall s (process start included) | training s | steps | peak GPU MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, row in g["recipe"]["stages"].items():
        lines.append(
            f"| {stage} | {row['wall_seconds']:.1f} | {f(row.get('seconds'), 1) if row.get('steps') else ''} | "
            f"{f(row.get('steps'))} | {f(row.get('peak_gpu_mb'), 0)} |"
        )
    lines += [f"| **whole recipe** | **{g['recipe']['total_wall_seconds']:.1f}** | | | |", ""]
    scores = g["recipe"].get("eval") or {}
    domains = list(dict.fromkeys(d for per in scores.values() for d in per))
    lines += [
        "| model | " + " | ".join(f"{d} exact match / perplexity" for d in domains) + " |",
        "|---|" + "---|" * len(domains),
    ]
    for model, per in scores.items():
        cells = []
        for d in domains:
            cell = per.get(d) or {}
            ppl = cell.get("perplexity")
            cells.append(f"{em(cell.get('exact_match'))} / {f(ppl['mean'] if isinstance(ppl, dict) else ppl, 2)}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def seeds_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        f"Seeds {summary['seeds']}. Cell: mean ± std [min, max] over seeds; below it each seed's value (95% CI).",
        "",
        seeds_report.table(summary["models"], with_seeds=True),
    ]
    if summary.get("forgetting"):
        lines += ["", "Forgetting (the best earlier stage minus this one; positive = lost):", ""]
        lines.append(seeds_report.table(summary["forgetting"], with_seeds=False))
    names = list(dict.fromkeys(n for t in summary["targets"].values() for n in t))
    lines += ["", "Stage targets per seed:", "", "| seed | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for seed, targets in summary["targets"].items():
        cells = [
            ("pass" if t["passed"] else "FAIL" if t["passed"] is False else "n/a") + f": {t['detail']}"
            for t in (targets.get(n, {"passed": None, "detail": ""}) for n in names)
        ]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines


def ckpt_average_table(c: dict[str, Any]) -> list[str]:
    domains = [d for d in next(iter(c["summary"].values())) if d != "mean"]
    names = {
        "wsd": "WSD (the recipe's sft schedule)",
        "constant_avg": f"constant LR + `average_last: {c['setup']['last_k']}`",
    }
    lines = [
        f"{c['setup']['variant']}, {c['setup']['steps']} steps, seeds {c['setup']['seeds']}; mean ± std over seeds.",
        "",
        "| schedule | " + " | ".join(domains) + " | mean |",
        "|---|" + "---|" * (len(domains) + 1),
    ]
    for key, per in c["summary"].items():
        cells = [f"{per[d]['mean']:.3f} ± {per[d]['std']:.3f}" for d in (*domains, "mean")]
        lines.append(f"| {names.get(key, key)} | " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class Table:
    source: Path
    render: Callable[[dict[str, Any]], list[str] | str]


def _result(name: str) -> Path:
    return RESULTS / f"{name}.json"


TABLES: dict[str, Table] = {
    "e2e": Table(_result("e2e"), e2e_table),
    "throughput": Table(_result("e2e"), throughput_table),
    "against-bare": Table(_result("throughput"), against_bare_table),
    "overhead": Table(_result("overhead"), overhead_table),
    "cache": Table(_result("cache"), cache_table),
    "startup": Table(_result("startup"), startup_table),
    "gpu-check": Table(_result("gpu_check_smoke"), gpu_check_table),
    "seeds": Table(SEEDS, seeds_table),
    "cpt-ablations": Table(_result("quality_seeds"), lambda r: [quality.render_seed_ablations(r)]),
    "merge-disjoint": Table(_result("merge_compare_disjoint"), lambda r: [merge_compare.table(r)]),
    "merge-emphasis": Table(_result("merge_compare_emphasis"), lambda r: [merge_compare.table(r)]),
    "ckpt-average": Table(_result("ckpt_average"), ckpt_average_table),
    "smollm2-against-bare": Table(_result("throughput_smollm2"), against_bare_table),
    "smollm2-gpu": Table(_result("gpu_recipe_smollm2"), gpu_recipe_table),
    "engines-cpu": Table(_result("engines_cpu"), lambda r: [engines_cpu.render(r)]),
    "adaptive": Table(
        _result("adaptive_compare"), lambda r: [adaptive_compare.report(r, r["base_val_exact_match"])["markdown"]]
    ),
    "team-mode": Table(_result("team_mode"), lambda r: [team_mode.render(r)]),
}


def render(name: str) -> str:
    table = TABLES[name]
    data = json.loads(table.source.read_text())
    body = table.render(data)
    lines = body if isinstance(body, list) else [body]
    return "\n".join([source_line(table.source, data), "", *lines]).rstrip() + "\n"


# --------------------------------------------------------------------------- the files


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def rendered(text: str, where: Path) -> str:
    """`text` with every table block rendered again; an unknown table name is an error naming the file."""

    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise SystemExit(f"{where}: table {name!r} is not one of bench/report.py's tables {sorted(TABLES)}")
        return f"<!-- table:{name} -->\n{render(name)}<!-- /table:{name} -->"

    return MARKER.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a table differs from what its JSON renders")
    parser.add_argument("--print", metavar="NAME", choices=sorted(TABLES), help="print one table")
    args = parser.parse_args(argv)
    if args.print:
        print(render(args.print), end="")
        return 0
    stale = []
    for path in documents():
        text = path.read_text()
        fresh = rendered(text, path)
        if fresh == text:
            continue
        stale += [f"{path.relative_to(REPO)}: table {m.group(1)}" for m in MARKER.finditer(text)
                  if m.group(0) not in fresh]  # fmt: skip
        if not args.check:
            path.write_text(fresh)
    if args.check and stale:
        print("tables that differ from their committed JSON (rerun `python bench/report.py`, never edit them by hand):")
        print("\n".join(f"  {line}" for line in stale))
        return 1
    print("every table matches its JSON" if args.check else f"{len(stale)} table(s) rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
