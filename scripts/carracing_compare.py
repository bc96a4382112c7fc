"""Compare finished (or still running) runs at equal env frames: one markdown table row per run.

    python scripts/carracing_compare.py outputs/carracing_compare/sac_s0 outputs/carracing_compare/goal_hrl_s0

Reads each run's metrics.jsonl (eval/return_mean, eval/return_std at every evaluation), config.yaml
(action_repeat, to turn agent steps into frames) and results.json when the run finished (wall time).
Prints every evaluation, then the last evaluation step all runs reached, so unequal run lengths
still compare at equal frames."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def evals(run: Path) -> dict[int, tuple[float, float]]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line) if line.strip() else {}
        if "eval/return_mean" in m:
            out[m["step"]] = (m["eval/return_mean"], m["eval/return_std"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    args = parser.parse_args()
    table = {}
    for run in args.runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
        table[run] = (cfg["agent"]["_target_"].rsplit(".", 1)[-1], cfg["env"]["action_repeat"], evals(run), results)
    print("| run | agent | step | frames | eval return (mean ± std) |")
    print("|---|---|---|---|---|")
    for run, (agent, repeat, ev, _) in table.items():
        for step, (mean, std) in sorted(ev.items()):
            print(f"| {run.name} | {agent} | {step} | {step * repeat} | {mean:.1f} ± {std:.1f} |")
    common = set.intersection(*(set(ev) for _, _, ev, _ in table.values()))
    if common:
        step = max(common)
        print(f"\nat the last common evaluation (step {step}):")
        for run, (agent, repeat, ev, results) in table.items():
            wall = f", wall {results['wall_time_s'] / 60:.0f} min for {results['frames']} frames" if results else ""
            print(f"  {run.name} ({agent}): {ev[step][0]:.1f} ± {ev[step][1]:.1f} at {step * repeat} frames{wall}")


if __name__ == "__main__":
    main()
