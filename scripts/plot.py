"""Learning curves and a results table from runs: mean ± std over seeds, one line per configuration.

    python scripts/plot.py outputs/multirun/2026-11-22/03-10-00                # a whole sweep
    python scripts/plot.py outputs/2026-11-22/*_sac_pendulum_* --out sac.png --table sac.md

A run is any directory holding config.yaml and tb/ (found recursively). Runs are grouped by their
whole saved config except the keys that do not change the experiment (seed, resume, device, threads,
progress bar, video/buffer/checkpoint/log cadence; --ignore adds more): the seeds of one setting
form one group, and the legend names only the settings that differ between groups. Curves come from the TensorBoard events (metrics.jsonl when a run has
no events for the tag); the table's final returns come from each run's results.json, the number the
run itself reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

# keys that never change what a run learns: where/how it ran and what it wrote on the side
IGNORED_KEYS = {"seed", "resume", "device", "threads", "trainer.progress", "trainer.log_eval_video",
                "trainer.save_buffer", "trainer.checkpoint_every", "trainer.log_every"}


def find_runs(paths: list[Path]) -> list[Path]:
    runs = set()
    for p in paths:
        candidates = [p, *p.rglob("config.yaml")] if p.is_dir() else []
        for c in candidates:
            d = c.parent if c.name == "config.yaml" else c
            if (d / "config.yaml").is_file() and (d / "tb").is_dir():
                runs.add(d.resolve())
    return sorted(runs)


def flatten(node, prefix: str = "") -> dict[str, object]:
    flat = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
    return flat


def load_config(run: Path, ignored: set[str]) -> dict:
    cfg = flatten(yaml.safe_load((run / "config.yaml").read_text()) or {})
    if cfg.get("branch_from"):  # branches of different seeds' runs group together, apart from runs from scratch
        cfg["branch_from"] = "a run"
    return {k: v for k, v in cfg.items() if k not in ignored}


def read_curve(run: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag; the last value wins when a step repeats."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag in acc.Tags().get("scalars", []):
        return {e.step: e.value for e in acc.Scalars(tag)}
    curve = {}  # no TensorBoard events for the tag: the JSONL copy the logger keeps
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get(tag) is not None:  # null: a non-finite value the logger refused to write as NaN
                curve[int(row["step"])] = float(row[tag])
    return curve


def final_return(run: Path) -> float | None:
    results = run / "results.json"
    if not results.exists():
        return None
    return float(json.loads(results.read_text())["eval/return_mean"])


def short(value) -> str:
    """Legend-friendly value: the class name of a _target_, floats without noise."""
    if isinstance(value, str) and "." in value and value.split(".")[-1][:1].isupper():
        return value.split(".")[-1]
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def fmt(x: float, like: float | None = None) -> str:
    """Returns with one decimal; small values (success rates, sparse returns) with two. A std takes
    the decimals of its mean (`like`)."""
    return f"{x:.2f}" if abs(x if like is None else like) < 10 else f"{x:.1f}"


def group_runs(runs: list[Path], ignored: set[str]) -> tuple[list[dict], list[str]]:
    """Groups of runs with the same config (seed aside) and the keys whose values differ between groups."""
    groups: dict[str, dict] = {}
    for run in runs:
        cfg = load_config(run, ignored)
        key = json.dumps(cfg, sort_keys=True, default=str)
        groups.setdefault(key, {"config": cfg, "runs": []})["runs"].append(run)
    configs = [g["config"] for g in groups.values()]
    all_keys = sorted(set().union(*configs)) if configs else []
    differing = [k for k in all_keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    # a key only some groups have either comes with a different _target_ (sac vs goal_hrl: the class
    # names it) or was added to the same agent after older runs were made (named, "None" where unset)
    def same_agent(k: str) -> bool:
        targets = {c.get("agent._target_") for c in configs if k in c}
        return all(c.get("agent._target_") in targets for c in configs if k not in c)

    label_keys = [k for k in differing if same_agent(k)] or differing

    def named(c: dict, keys: list[str]) -> str:
        return ", ".join(f"{k.removesuffix('._target_')}={short(c.get(k))}" for k in keys)

    for g in groups.values():
        c = g["config"]
        if differing:
            g["label"] = named(c, label_keys)
        else:  # one configuration: name what it is
            env_name = c.get("env.id", "env") + (f" {c['env.task']}" if c.get("env.task") else "")
            g["label"] = f"{short(c.get('agent._target_', 'agent'))} on {env_name}"
    # groups that share a label (goal_hrl with planning on and off beside sac: the planning keys exist
    # only in goal_hrl's configs) also name the keys that tell them apart
    by_label: dict[str, list[dict]] = {}
    for g in groups.values():
        by_label.setdefault(g["label"], []).append(g)
    for same in (v for v in by_label.values() if len(v) > 1):
        extra = [k for k in differing if k not in label_keys
                 and len({json.dumps(g["config"].get(k), default=str) for g in same}) > 1]
        for g in same:
            g["label"] = f"{g['label']}, {named(g['config'], extra)}"
    return sorted(groups.values(), key=lambda g: g["label"]), differing


def seeds_of(runs: list[Path]) -> list:
    return [yaml.safe_load((r / "config.yaml").read_text()).get("seed") for r in runs]


def plot(groups: list[dict], tag: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for g in groups:
        curves = [c for c in (read_curve(r, tag) for r in g["runs"]) if c]
        if not curves:
            print(f"warning: no '{tag}' values in {g['label']}; not plotted", file=sys.stderr)
            continue
        # seeds are aligned on the steps they all logged (a crashed or longer run would skew the mean)
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            print(f"warning: the seeds of {g['label']} share no logged step; not plotted", file=sys.stderr)
            continue
        values = np.array([[c[s] for s in steps] for c in curves])
        mean, std = values.mean(axis=0), values.std(axis=0)
        line, = ax.plot(steps, mean, marker="o" if len(steps) < 20 else None, ms=3,
                        label=f"{g['label']} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    # the trainer counts agent steps; with action repeat each is several env frames
    repeats = {g["config"].get("env.action_repeat", 1) for g in groups}
    ax.set_xlabel("environment steps" if repeats <= {1} else "agent steps (env frames / env.action_repeat)")
    ax.set_ylabel(tag)
    ax.set_title(f"{tag}: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    if ax.lines:  # below the axes: long labels never hide the curves
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.14), frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def table(groups: list[dict], differing: list[str], tag: str = "eval/return_mean") -> str:
    """Markdown: final eval return (each run's own results.json) mean ± std over seeds with every seed's
    value, then the `tag` curve (mean ± std over seeds) at each step all seeds of a group logged."""
    lines = ["| configuration | final return (mean ± std) | seeds | steps | per seed |", "|---|---|---|---|---|"]
    for g in groups:
        finals = [(r, final_return(r)) for r in g["runs"]]
        done = [(r, v) for r, v in finals if v is not None]
        if done:
            vals = np.array([v for _, v in done])
            cell = f"{fmt(vals.mean())} ± {fmt(vals.std(), vals.mean())}"
            steps = sorted({json.loads((r / "results.json").read_text()).get("step") for r, _ in done})
        else:
            cell, steps = "no finished run", []
        seeds = seeds_of([r for r, _ in done])
        unfinished = len(finals) - len(done)
        seed_cell = f"{len(done)} ({', '.join(map(str, seeds))})" + (f" + {unfinished} unfinished" if unfinished else "")
        per_seed = ", ".join(f"s{s}: {fmt(v)}" for s, (_, v) in zip(seeds, done))
        lines.append(f"| {g['label']} | {cell} | {seed_cell} | {', '.join(map(str, steps))} | {per_seed} |")
    note = f"\nGroups differ in: {', '.join(differing)}." if differing else ""
    return ("\n".join(lines) + "\n" + note + "\nstd is the population std over seeds (numpy ddof=0).\n\n"
            + curve_table(groups, tag))


def curve_table(groups: list[dict], tag: str) -> str:
    """Markdown: one row per logged step (and env frames), one column per group: mean ± std over seeds."""
    columns = {}
    for g in groups:
        curves = [c for c in (read_curve(r, tag) for r in g["runs"]) if c]
        if curves:
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            columns[g["label"]] = {s: np.array([c[s] for c in curves]) for s in steps}
    if not columns:
        return ""
    repeats = {g["label"]: g["config"].get("env.action_repeat", 1) or 1 for g in groups}
    rows = sorted(set().union(*columns.values()))
    out = [f"`{tag}` at each step (mean ± std over seeds; frames = steps x env.action_repeat):", "",
           "| step | frames | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for step in rows:
        frames = {step * repeats[label] for label in columns}
        cells = [f"{fmt(v.mean())} ± {fmt(v.std(), v.mean())}" if (v := col.get(step)) is not None else ""
                 for col in columns.values()]
        out.append(f"| {step} | {'/'.join(map(str, sorted(frames)))} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="sweep directories and/or run directories")
    p.add_argument("--out", type=Path, default=None, help="PNG (default: curves.png in the one directory given, "
                                                             "else in the current directory)")
    p.add_argument("--table", type=Path, default=None, help="markdown table (default: results.md next to the PNG)")
    p.add_argument("--tag", default="eval/return_mean", help="scalar to plot (default eval/return_mean)")
    p.add_argument("--ignore", nargs="*", default=[], help="more config keys that do not separate groups")
    args = p.parse_args(argv)

    missing = [str(x) for x in args.paths if not x.exists()]
    if missing:
        print(f"error: no such path: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = find_runs(args.paths)
    failed = [r for r in runs if (r / "FAILED").exists()]
    runs = [r for r in runs if r not in failed]
    for r in failed:
        print(f"skipping failed run {r} (see {r / 'FAILED'})", file=sys.stderr)
    if not runs:
        print("error: no runs found (a run directory holds config.yaml and tb/): pass a sweep directory "
              "(outputs/multirun/<date>/<time>) or run directories", file=sys.stderr)
        return 2
    groups, differing = group_runs(runs, IGNORED_KEYS | set(args.ignore))
    base = args.paths[0] if len(args.paths) == 1 and args.paths[0].is_dir() else Path(".")
    out = args.out or base / "curves.png"
    table_path = args.table or out.with_name("results.md")
    plot(groups, args.tag, out)
    md = table(groups, differing, args.tag)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(md)
    print(md)
    print(f"{len(runs)} runs in {len(groups)} groups; plot: {out}; table: {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
