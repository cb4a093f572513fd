"""Render the benchmark JSON (artifacts/bench/*.json) as the README table between
`<!-- bench:start -->` and `<!-- bench:end -->`. Every figure comes from those files.

    python bench/report.py [--readme README.md] [--print]
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, load_result, machine_info

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


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


def ci(value: Any, interval: dict[str, Any] | None) -> str:
    if value is None:
        return "–"
    if not interval:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval['ci_low']:.3f}, {interval['ci_high']:.3f}]"


def median_of(repeats: list[dict[str, Any]], side: str, key: str) -> float:
    """Median of one figure (`key`) of one side (`bare`, `dvc`, `stage`, ...) over the repetitions."""
    return statistics.median(r[side][key] for r in repeats)


def em(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "–"
    return f"{cell['mean']:.3f} [{cell['ci_low']:.3f}, {cell['ci_high']:.3f}]"


def section_e2e(e2e: dict[str, Any]) -> list[str]:
    run = e2e["full_run"]
    threads = sorted({s.get("threads") for s in run["stages"].values() if s.get("threads")})
    lines = [
        "### End to end (default recipe, clean copy, set-up excluded)",
        "",
        f"Total **{run['total_seconds']:.0f} s** ({run['total_seconds'] / 60:.1f} min; target ≤ 10 min on 2 cores: "
        f"{met(run['total_seconds'] <= 600)}); torch threads {threads}; nothing left to run afterwards: "
        f"{f(not run['left_to_run_after'])}. Measured {e2e['measured_at']}, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in e2e['machine']['load_average'])}.",
    ]
    lines += [
        "",
        "| stage | wall s (`dvc repro --single-item`) | inside the stage function s | trainer.train() s | "
        "outside the stage function s (process start, imports, DVC, MLflow) |",
        "|---|---:|---:|---:|---:|",
    ]
    trainer = e2e.get("trainer_metrics") or {}
    for stage, row in run["stages"].items():
        inner = row.get("stage_seconds")
        train = trainer.get(stage, {}).get("seconds")
        lines.append(
            f"| {stage} | {row['wall_seconds']:.1f} | {f(inner, 1)} | {f(train, 1)} | "
            f"{f(row['wall_seconds'] - inner if inner is not None else None, 1)} |"
        )
    setup = e2e.get("setup")
    if setup:
        lines += [
            "",
            f"Set-up (`bash scripts/setup.sh`, fresh venv, pip's download cache warm): {setup['seconds']:.0f} s "
            f"(exit {setup['returncode']}); end to end with set-up: {run['total_seconds'] + setup['seconds']:.0f} s "
            f"({(run['total_seconds'] + setup['seconds']) / 60:.1f} min).",
        ]
    return lines + [""]


def section_quality(q: dict[str, Any]) -> list[str]:
    ladder = q.get("ladder")
    if not ladder:
        return ["### Quality ladder", "", "Not measured: the end-to-end run of the default recipe did not finish.", ""] + \
            section_ablations(q)  # fmt: skip
    stages = ladder["stages"]
    domains = sorted({d for s in stages.values() for d in s["domains"]}, key=["add", "rev", "sub", "add3"].index
                     if set(d for s in stages.values() for d in s["domains"]) <= {"add", "rev", "sub", "add3"} else str)  # fmt: skip
    lines = [
        f"### Quality ladder: held-out exact match [{int(100 * (ladder['confidence'] or 0.95))}% bootstrap CI], "
        f"first {ladder['max_items']} test items per domain",
        "",
        "| stage | wall s | " + " | ".join(domains) + " |",
        "|---|---:|" + "---|" * len(domains),
    ]
    for stage, row in stages.items():
        lines.append(
            f"| {stage} | {f(row['wall_seconds'], 1)} | "
            + " | ".join(em(row["domains"].get(d)) for d in domains)
            + " |"
        )
    other = ladder.get("other_stage_wall_seconds") or {}
    if other:
        lines += ["", "Wall time of the other stages: " + ", ".join(f"{s} {v:.1f} s" for s, v in other.items())
                  + " (each `dvc repro --single-item <stage>`, process start and DVC included)."]  # fmt: skip
    return lines + [""] + section_ablations(q)


def section_ablations(q: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    runs = {"recipe (WSD, replay 25%)": q.get("recipe_cpt"), **{k: v for k, v in (q.get("ablations") or {}).items()}}
    names = {"no_replay": "WSD, no replay", "cosine": "cosine re-warm, replay", "constant_cooldown": "constant + cool-down, replay",
             "wsd": "WSD, replay"}  # fmt: skip
    lines += [
        "### CPT ablations (same 300 steps, peak LR, warm-up 5%, floor 0; `dvc exp run -S ... cpt`, then evaluate)",
        "",
        "| cpt variant | EM add | EM rev | EM sub (new) | forgetting add | forgetting rev | gain sub |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in runs.items():
        if not row:
            continue
        emc, fo = row["em_cpt"], row["forgetting_old"]
        lines.append(
            f"| {names.get(key, key)} | {f(emc.get('add'), 3)} | {f(emc.get('rev'), 3)} | {f(emc.get('sub'), 3)} | "
            f"{ci(fo.get('add'), (row.get('forgetting_ci') or {}).get('add'))} | "
            f"{ci(fo.get('rev'), (row.get('forgetting_ci') or {}).get('rev'))} | {f(row['gain_new'], 3)} |"
        )
    lines.append("")
    lines.append(
        "Forgetting = exact match of `pretrain` − exact match of `cpt` (positive: lost) with its paired 95% bootstrap CI; "
        "gain = the same on `sub`, reversed. Exact match of the pretrain model they start from: "
        + ", ".join(
            f"{d} {v['mean']:.3f}"
            for d, v in ((q.get("recipe_cpt") or {}).get("scores", {}).get("pretrain", {})).items()
        )
        + "."
    )
    return lines + [""]


OVERHEAD_MODES = {
    "dvc": "`dvc repro --single-item sft`",
    "flow": "flow, temporary Prefect server (`posttrain run --stages sft`, no PREFECT_API_URL)",
    "flow_server": "flow, running Prefect server (PREFECT_API_URL)",
}


def section_overhead(o: dict[str, Any]) -> list[str]:
    lines = [
        "### Overhead against a bare TRL script (`bench/bare_trl.py --stage sft`), same model, data, steps, seed",
        "",
        "| threads | steps | run as | wall s | ratio to bare (target ≤ 1.10) | added s | tokens/s | RSS MB | "
        "final loss |",
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
    lines += [
        "",
        f"{len(first['repeats'])} repetitions side by side (bare, then each way of running the stage, in turn); "
        "medians of the per-repetition ratios. Added seconds = pipeline wall − bare wall of the same repetition. "
        f"Same final loss in every run: {f(all(e['summary']['identical_final_loss'] for e in o['by_threads'].values()))}. "
        "Stage tokens/s is over training alone (`trainer.train()` minus its continual evaluation); the "
        "stage's wall time includes that evaluation (before, every `eval_every` steps, after), its MLflow "
        "record and DVC's hashing, which the bare script does not do. Prefect's cost (temporary server, "
        "flow run) is paid once per `posttrain run`, not once per stage.",
    ]
    return lines + [""]


def section_cache(c: dict[str, Any]) -> list[str]:
    r, fl, g = c["no_change_dvc_repro"], c["no_change_flow"], c["grpo_change"]
    return [
        "### Cache",
        "",
        f"After a full run of the {c.get('recipe', 'default (params.yaml)')} recipe.",
        "",
        "| what | seconds (median) | target | |",
        "|---|---:|---:|---|",
        f"| no-change `dvc repro` | {r['median_seconds']:.2f} | ≤ 3 | {met(r['target_met'])} |",
        f"| no-change `dvc status` | {c['dvc_status_seconds']['median_seconds']:.2f} | | |",
        f"| no-change flow (`posttrain run`) | {fl['median_seconds']:.2f} | ≤ 10 | {met(fl['target_met'])} |",
        f"| first no-change flow call (Prefect is not started when `dvc status` finds nothing to run) | "
        f"{fl['first_call_seconds']:.2f} | | |",
        f"| no-change `posttrain run --no-prefect` | {c['no_change_no_prefect_seconds']['median_seconds']:.2f} | | |",
        "",
        f"`{g.get('command') or g['changed']}` ({g['changed']}): DVC ran {', '.join(g['stages_ran']) or 'nothing'} — "
        "exactly grpo and its "
        f"descendants: {f(g['exact'])}.",
        "",
    ]


def section_startup(s: dict[str, Any]) -> list[str]:
    lines = [
        "### Start-up cost (fresh processes, median)",
        "",
        f"`python -c pass`: {s['python_startup']['median_seconds']:.2f} s. "
        + "CLI: "
        + ", ".join(f"`{k}` {v['median_seconds']:.2f} s" for k, v in s["cli"].items())
        + f" (target ~1 s; heavy modules imported by `posttrain.pipeline.cli`: {', '.join(s['heavy_modules_imported_by_cli']) or 'none'}; "
        + f"`status` asks DVC for the stale stages, on the {'tiny' if 'tiny' in s['project'] else 'default'} recipe's run). "
        + "Importing a stage module loads what that stage needs (TRL's trainer for the trainer stages); the CLI "
        + "imports none of it.",
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
    return lines + [""]


def section_throughput(e2e: dict[str, Any], t: dict[str, Any] | None) -> list[str]:
    rows = e2e.get("trainer_metrics") or {}
    if not rows:
        return []
    lines = [
        "### Throughput and memory per trainer stage (default recipe, from each stage's metrics JSON)",
        "",
        "| stage | steps | trainer.train() s | of which continual eval s | steps/s | tokens/s | peak RSS MB | threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, m in rows.items():
        lines.append(
            f"| {stage} | {f(m.get('steps'))} | {f(m.get('seconds'), 1)} | {f(m.get('eval_seconds'), 1)} | "
            f"{f(m.get('steps_per_second'))} | {f(m.get('tokens_per_second'), 0)} | {f(m.get('peak_rss_mb'), 0)} | "
            f"{f(m.get('threads'))} |"
        )
    lines += ["", "Rates are over training alone: `trainer.train()` minus the continual evaluation inside it.", ""]
    if not t or not t.get("stages"):
        return lines
    lines += [
        "Against a bare TRL script of the same configuration (`bench/bare_trl.py --stage <stage>`: same model, "
        f"data, trainer settings, schedule and seed; {t['repeats']} repetitions side by side, medians):",
        "",
        "| stage | steps | tokens/s bare | tokens/s stage | ratio (target ≥ 0.9) | peak RSS MB bare / stage | "
        "RSS ratio | same final loss |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for stage, entry in t["stages"].items():
        sm = entry["summary"]
        med = functools.partial(median_of, entry["repeats"])
        lines.append(
            f"| {stage} | {entry['max_steps']} | {med('bare', 'tokens_per_second'):.0f} | "
            f"{med('stage', 'tokens_per_second'):.0f} | {sm['tokens_per_second_ratio_median']:.3f} "
            f"({met(sm['throughput_target_met'])}) | {med('bare', 'peak_rss_mb'):.0f} / {med('stage', 'peak_rss_mb'):.0f} | "
            f"{sm['peak_rss_ratio_median']:.3f} | {f(sm['identical_final_loss'])} "
            f"({', '.join(f'{x:.6f}' for x in sm['final_losses'])}) |"
        )
    return lines + [""]


def section_gpu(g: dict[str, Any]) -> list[str]:
    """The GPU check (bench/gpu_check.py): its table when it ran on a GPU, else what the CPU smoke run showed."""
    from bench.gpu_check import render

    if g.get("mode") == "gpu":
        return ["### GPU check (`bench/gpu_check.sh`, docs/gpu.md)", "", render(g), ""]
    stages = g.get("stages", {})
    ok = [s for s, e in stages.items() if e.get("stage") and e.get("bare") and e.get("same_final_loss")]
    return [
        "### GPU check (`bench/gpu_check.sh`, docs/gpu.md)",
        "",
        f"**Not run on a GPU yet**: no GPU figure (MFU, tokens/s, memory) is measured. Its `--cpu-smoke` run "
        f"(the same code at toy size on CPU) ran {', '.join(ok) or 'no stage'} against the bare TRL script with "
        f"identical final losses; FSDP2 at world size 1: {'ok' if (g.get('fsdp') or {}).get('ok') else 'not ok'}.",
        "",
    ]


def measured_span(parts: dict[str, dict[str, Any]]) -> str:
    stamps = sorted(r["measured_at"] for r in parts.values() if r.get("measured_at"))
    if not stamps:
        return "(no results)"
    return stamps[0] if stamps[0] == stamps[-1] else f"{stamps[0]} to {stamps[-1]}"


def load_note(parts: dict[str, dict[str, Any]], cores: int) -> str:
    """The 1-minute load average each part ended with: the reader judges how quiet the machine was."""
    loads = {n: r["machine"]["load_average"][0] for n, r in parts.items() if r.get("machine")}
    if not loads:
        return ""
    shared = max(loads.values()) > cores + 0.5
    return (
        "1-minute load average at the end of each part: "
        + ", ".join(f"{n} {v:.1f}" for n, v in loads.items())
        + (
            f" (above the {cores} cores: other jobs shared the machine, absolute seconds are inflated; "
            "ratios were measured side by side)."
            if shared
            else f" (at most the {cores} cores: the suite had the machine to itself)."
        )
    )


def render() -> str:
    names = ("e2e", "quality", "throughput", "overhead", "cache", "startup", "gpu_check")
    parts = {n: r for n in names if (r := load_result(n))}
    e2e, q, t, o, c, s, g = (parts.get(n) for n in names)
    g = g or load_result("gpu_check_smoke")
    m = machine_info()
    threads_seen = sorted({str(x) for x in [s and s.get("torch_threads_default")] if x})
    lines = [
        "`python bench/run.py --all` runs the CPU benchmark suite (`--only e2e,quality,throughput,cache,overhead,startup,gpu,report` "
        "for parts) in scratch copies of the project, writes `artifacts/bench/*.json` and renders this section "
        "(`bench/report.py`). `bench/gpu_check.sh` is the GPU check (docs/gpu.md): every trainer stage of the "
        "GPU throughput recipe against bare TRL, MFU, memory, FSDP2.",
        "",
        f"Produced by `python bench/run.py` (`bench/report.py` renders `artifacts/bench/*.json`), measured "
        f"{measured_span(parts)}: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB RAM, no GPU, torch default "
        f"threads {', '.join(threads_seen) or '?'}; torch {m['versions']['torch']}, transformers "
        f"{m['versions']['transformers']}, trl {m['versions']['trl']}. {load_note(parts, m['cores'])}",
        "",
    ]
    partial = load_result("e2e-partial")
    if not e2e:
        lines += [
            "### End to end",
            "",
            "**Not finished**: the end-to-end run of the default recipe was stopped during `sft`.",
        ]
        if partial and partial["full_run"]["stages"]:
            walls = partial["full_run"]["stages"]
            lines += [
                "Wall time of the stages it finished (`dvc repro --single-item`, from the script's log): "
                + ", ".join(f"{k} {v['wall_seconds']:.1f} s" for k, v in walls.items())
                + f" = {sum(v['wall_seconds'] for v in walls.values()):.0f} s, already past the 10-minute target."
            ]
        lines.append("")
        if partial:
            lines += section_throughput(partial, None)
    if not s:
        lines += ["### Start-up cost", "", "Not measured in this run of the suite.", ""]
    if e2e:
        lines += section_e2e(e2e)
    if q:
        lines += section_quality(q)
    if e2e:
        lines += section_throughput(e2e, t)
    for data, fn in ((o, section_overhead),
                     (c, section_cache), (s, section_startup), (g, section_gpu)):  # fmt: skip
        if data:
            lines += fn(data)
    return "\n".join(lines).rstrip() + "\n"


def write_readme(readme: Path, body: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{body}{END}{tail}")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--print", action="store_true", help="print the table instead of writing README")
    args = parser.parse_args(argv)
    body = render()
    if args.print:
        print(body)
    else:
        write_readme(args.readme, body)
        print(f"README table written from {RESULTS}")
    return body


if __name__ == "__main__":
    main()
