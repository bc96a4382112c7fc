"""Per-run tables of scalars averaged over bins of agent steps: when a run starts to learn, and what its
goal/ metrics did meanwhile, seed by seed (the mean curve of plot.py hides a seed that starts late).

    python scripts/bins.py outputs/issue9i/recent --bin 2000
    python scripts/bins.py outputs/a outputs/b --tags train/episode_return goal/relative_success \
        goal/relative_success_mirror goal/closer goal/progress --bin 4000 --out bins.md

One table per tag: a row per run (agent, seed, and where the run has one, the agent step at which a
goal_hrl goal-free first phase ended: the first `goal/phase_open` = 1), a column per bin of `--bin`
agent steps (frames = steps x env.action_repeat), each cell the mean of the values logged in that bin.
In the first tag's table the first bin above `--onset` is bold (the default, train/episode_return
above 0, is the step a CarRacing car starts to drive). Values come from the same reader as plot.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot import IGNORED_KEYS, fmt, find_runs, group_runs, read_curve, short  # noqa: E402  (scripts/ is not a package)

GATE_TAG = "goal/phase_open"


def binned(curve: dict[int, float], width: int) -> dict[int, float]:
    """Bin start -> mean of the values logged at steps in [start, start + width); a value logged at
    step s belongs to the bin holding s - 1 (a value logged at 2000 closes the 0-2k bin)."""
    sums: dict[int, list[float]] = {}
    for step, value in curve.items():
        sums.setdefault(max(step - 1, 0) // width * width, []).append(value)
    return {start: float(np.mean(v)) for start, v in sorted(sums.items())}


def gate_step(run: Path) -> tuple[int | None, bool]:
    """The first agent step at which the goal-free first phase was over (None: no such phase, or still
    closed), and whether it was already over at the run's first log (a branch of a run that had opened it)."""
    curve = read_curve(run, GATE_TAG)
    opened = [step for step, value in curve.items() if value >= 0.5]
    if not opened:
        return None, False
    return min(opened), min(opened) == min(curve)


def run_labels(runs: list[Path]) -> dict[Path, str]:
    """Agent and seed, the config keys that tell the runs' configurations apart (as plot.py's legend),
    and the gate step."""
    groups, _ = group_runs(runs, IGNORED_KEYS)
    config_label = {run: g["label"] for g in groups for run in g["runs"]} if len(groups) > 1 else {}
    labels = {}
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        label = f"{short(cfg.get('agent', {}).get('_target_', 'agent'))} seed {cfg.get('seed')}"
        if run in config_label:
            label += f", {config_label[run]}"
        gate, at_start = gate_step(run)
        if gate is not None:
            label += (f" (goals already on at its first log, {gate / 1000:g}k)" if at_start
                      else f" (goals on from {gate / 1000:g}k)")
        labels[run] = label
    return labels


def bin_table(labels: dict[Path, str], tag: str, width: int, onset: float | None) -> str:
    rows = {run: binned(read_curve(run, tag), width) for run in labels}
    starts = sorted(set().union(*rows.values()))
    if not starts:
        return f"`{tag}`: not logged by these runs\n"
    heads = [f"{s / 1000:g}-{(s + width) / 1000:g}k" for s in starts]
    lines = [f"`{tag}`, mean per {width}-agent-step bin" + (f" (bold: first bin above {onset:g})" if onset is not None
                                                          else ""), "",
             "| run | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for run, bins in rows.items():
        first = next((s for s in starts if s in bins and bins[s] > onset), None) if onset is not None else None
        cells = []
        for s in starts:
            cell = fmt(bins[s]) if s in bins else ""
            cells.append(f"**{cell}**" if s == first else cell)
        lines.append(f"| {labels[run]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="sweep directories and/or run directories")
    p.add_argument("--tags", nargs="+", default=["train/episode_return"], help="scalars, one table each")
    p.add_argument("--bin", type=int, default=2000, help="bin width in agent steps (default 2000)")
    p.add_argument("--onset", type=float, default=0.0, help="bold the first bin of the first tag above this")
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    if args.bin < 1:
        print(f"error: --bin must be >= 1 agent step, got {args.bin}", file=sys.stderr)
        return 2
    missing = [str(x) for x in args.paths if not x.exists()]
    if missing:
        print(f"error: no such path: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = find_runs(args.paths)
    if not runs:
        print("error: no runs found (a run directory holds config.yaml and tb/)", file=sys.stderr)
        return 2
    labels = run_labels(runs)  # read once: each label reads goal/phase_open
    md = "\n".join(bin_table(labels, tag, args.bin, args.onset if i == 0 else None) for i, tag in enumerate(args.tags))
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
