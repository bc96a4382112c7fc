"""Eval curves of several runs side by side (default: the HalfCheetah latent_mbpo vs sac comparison).

    .venv/bin/python scripts/halfcheetah_compare.py [RUN_DIR ...] [--json out.json]

Reads each run's metrics.jsonl (eval/return_mean, eval/return_std per evaluation) and, when present,
results.json (final return and wall time); prints one table with a row per evaluated env step.

The runs themselves (2 shared CPU cores; see conf/experiment/latent_mbpo_halfcheetah.yaml):
    python train.py agent=sac env=halfcheetah encoder=identity trainer.total_steps=30000 \\
        trainer.eval_every=5000 threads=1 hydra.run.dir=outputs/halfcheetah_compare/sac_identity_s0
    python train.py experiment=latent_mbpo_halfcheetah threads=1 \\
        hydra.run.dir=outputs/halfcheetah_compare/latent_mbpo_s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = [ROOT / "outputs/halfcheetah_compare/sac_identity_s0",
                ROOT / "outputs/halfcheetah_compare/latent_mbpo_s0"]


def eval_curve(run: Path) -> dict[int, tuple[float, float]]:
    curve = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval/return_mean" in rec:
            curve[rec["step"]] = (rec["eval/return_mean"], rec["eval/return_std"])
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = p.parse_args()
    curves = {run.name: eval_curve(run) for run in args.runs}
    steps = sorted({s for c in curves.values() for s in c})
    print(f"{'step':>7} " + " ".join(f"{name:>24}" for name in curves))
    for s in steps:
        cells = [f"{c[s][0]:10.1f} +- {c[s][1]:7.1f}  " if s in c else f"{'':>24}" for c in curves.values()]
        print(f"{s:7d} " + " ".join(cells))
    summary = {}
    for run in args.runs:
        res = run / "results.json"
        summary[run.name] = json.loads(res.read_text()) if res.exists() else {"finished": False}
        if res.exists():
            r = summary[run.name]
            print(f"{run.name}: final {r['eval/return_mean']:.1f} +- {r['eval/return_std']:.1f} at step {r['step']}, "
                  f"wall {r['wall_time_s'] / 60:.1f} min")
        else:
            print(f"{run.name}: not finished")
    if args.json:
        args.json.write_text(json.dumps({"curves": {k: {str(s): v for s, v in c.items()} for k, c in curves.items()},
                                         "results": summary}, indent=2))


if __name__ == "__main__":
    main()
