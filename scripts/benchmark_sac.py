"""Throughput benchmark: latentrl SAC vs stable-baselines3 SAC on HalfCheetah-v5, same settings
(256x256 MLPs, batch 256, one update per env step after warm-up, state observations), measured
in the same run and interleaved so machine noise hits both. Prints env steps/s of each and the
ratio, and writes them to a JSON file.

    python scripts/benchmark_sac.py [--steps 1500] [--rounds 3] [--threads N] [--out bench_results/sac_throughput.json]
Needs the `bench` extra (stable-baselines3): `make bench` installs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # reuse the test helper that composes configs like train.py


def ours(steps: int, warmup: int, seed: int) -> float:
    """The real training loop; its own perf/env_steps_per_s over the window after warm-up."""
    from conftest import compose_cfg
    from latentrl.train import run

    with tempfile.TemporaryDirectory() as d:
        run(compose_cfg(["env=halfcheetah", "agent=sac", "encoder=identity", f"seed={seed}", "device=cpu",
                         f"trainer.total_steps={warmup + steps}", f"trainer.warmup_steps={warmup}",
                         "trainer.eval_every=0", "trainer.eval_episodes=0", "trainer.checkpoint_every=0",
                         "trainer.save_buffer=false", "trainer.progress=false", f"trainer.log_every={steps}",
                         "agent.buffer_size=100000"]), run_dir=d)
        lines = [json.loads(ln) for ln in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        return [m for m in lines if m["step"] == warmup + steps and "perf/env_steps_per_s" in m][0][
            "perf/env_steps_per_s"]


def sb3(steps: int, warmup: int, seed: int) -> float:
    import gymnasium as gym
    from stable_baselines3 import SAC

    model = SAC("MlpPolicy", gym.make("HalfCheetah-v5"), learning_starts=warmup, batch_size=256, buffer_size=100_000,
                train_freq=1, gradient_steps=1, seed=seed, device="cpu", verbose=0)
    model.learn(warmup + 1)
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="measured env steps per round, after as many warm-up steps")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "sac_throughput.json"))
    args = p.parse_args()
    import conftest  # noqa: F401  (sets its own thread count on import: set ours after it)

    torch.set_num_threads(args.threads)
    results = {"latentrl": [], "sb3": []}
    for r in range(args.rounds):
        for name, fn in (("sb3", sb3), ("latentrl", ours)) if r % 2 else (("latentrl", ours), ("sb3", sb3)):
            sps = fn(args.steps, args.steps, seed=r)
            results[name].append(sps)
            print(f"round {r}: {name:8s} {sps:7.1f} env steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "env": "HalfCheetah-v5", "steps_per_round": args.steps, "warmup": args.steps, "rounds": args.rounds,
        "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "latentrl_steps_per_s": round(med["latentrl"], 1), "sb3_steps_per_s": round(med["sb3"], 1),
        "ratio": round(med["latentrl"] / med["sb3"], 3), "all_rounds": results,
    }
    print(f"latentrl {report['latentrl_steps_per_s']} steps/s vs stable-baselines3 {report['sb3_steps_per_s']} "
          f"steps/s: ratio {report['ratio']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
