"""Team mode on real services (docs/team-mode.md): runs the `team` tests once and keeps what they measured.

    python -m bench.team_mode            # tests/integration/test_team_services.py and test_team_faults.py
    python -m bench.team_mode --render   # the tables of docs/team-mode.md, from the committed JSON

Writes artifacts/bench/team_mode.json: the machine, each test's outcome and wall time (JUnit's total:
setup, call and teardown, so a module's shared services and runs count where they start), and the
figures the tests measure (`figure` in tests/helpers/team.py: runs at once, seconds a service was down,
runs and versions lost).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, log, machine_info

MODULES = ("tests/integration/test_team_services.py", "tests/integration/test_team_faults.py")
FIGURES_ENV = "POSTTRAIN_TEAM_FIGURES"  # tests/helpers/team.py
OUT = RESULTS / "team_mode.json"


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        figures, report = Path(scratch) / "figures.json", Path(scratch) / "junit.xml"
        env = os.environ | {FIGURES_ENV: str(figures), "PYTHONPATH": str(REPO)}
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", *MODULES, "-p", "no:cacheprovider", f"--junitxml={report}", "-q"],
            cwd=REPO, env=env, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        tests = []
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    outcome = "xfailed" if tag == "skipped" and "xfail" in (found.get("type") or "") else tag
            tests.append({"module": case.get("classname"), "test": case.get("name"), "outcome": outcome,
                          "seconds": round(float(case.get("time") or 0), 1)})  # fmt: skip
        measured = json.loads(figures.read_text()) if figures.is_file() else {}
    return {
        "machine": machine_info(),
        "pytest_exit_code": done.returncode,
        "wall_seconds": round(seconds, 1),
        "tests": tests,
        "figures": measured,
    }


def render(data: dict[str, Any]) -> str:
    """Markdown: one row per test (outcome, seconds), then the measured figures."""
    machine = data["machine"]
    lines = [
        f"Measured on {machine['cpu_model']} ({machine['cores']} cores, {machine['memory_gb']} GB), "
        f"load average {machine['load_average'][0]:.1f} at the end; all tests together "
        f"{data['wall_seconds'] / 60:.1f} min (pytest exit code {data['pytest_exit_code']}).",
        "",
        "| test | outcome | seconds |",
        "|---|---|---:|",
    ]
    for test in data["tests"]:
        lines.append(
            f"| `{test['module'].rsplit('.', 1)[-1]}::{test['test']}` | {test['outcome']} | {test['seconds']:.0f} |"
        )
    lines += ["", "| figure | value |", "|---|---:|"]
    lines += [f"| {name} | {str(value).replace('|', '/')} |" for name, value in sorted(data["figures"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="print the tables from the committed JSON")
    args = parser.parse_args()
    if not args.render:
        log("running the team tests (real services on 127.0.0.1)")
        data = run()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {OUT}")
    print(render(json.loads(OUT.read_text())))


if __name__ == "__main__":
    main()
