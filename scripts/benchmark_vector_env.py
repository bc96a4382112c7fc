"""Env throughput without learning: agent steps/s (summed over sub-envs) of one env vs env.num_envs
sub-envs, random actions, through the trainer's own TrainEnvs (seeded resets at episode ends
included), interleaved over rounds so machine noise hits every setting alike.

    python scripts/benchmark_vector_env.py [--overrides experiment=carracing_cpu] [--num-envs 1 2]
                                           [--vector-mode async] [--seconds 6] [--rounds 2]
                                           [--variants env.lazy_render=false env.lazy_render=true]

--variants adds one more override per setting, crossed with --num-envs (e.g. CarRacing drawing
every frame vs only the frames the agent sees); ratios are to the first setting of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test helper composes configs like train.py


def steps_per_s(env_cfg, num_envs: int, seconds: float, seed: int) -> float:
    from latentrl.envs import episode_seed
    from latentrl.envs.vector import TrainEnvs

    envs = TrainEnvs(env_cfg, num_envs)
    rng, episodes = np.random.default_rng(seed), [0] * num_envs
    try:
        envs.reset({i: episode_seed(seed, 0, env_index=i) for i in range(num_envs)})
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            actions = list(rng.uniform(-1, 1, (num_envs, *envs.action_space.shape)).astype(np.float32))
            ended = [i for i, (*_, term, trunc, _) in enumerate(envs.step(actions)) if term or trunc]
            for i in ended:
                episodes[i] += 1
            if ended:
                envs.reset({i: episode_seed(seed, episodes[i], env_index=i) for i in ended})
            steps += num_envs
        return steps / (time.perf_counter() - start)
    finally:
        envs.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overrides", nargs="*", default=["experiment=carracing_cpu"], help="config overrides of the env")
    p.add_argument("--num-envs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vector-mode", default="async", choices=["auto", "sync", "async"])
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per setting per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=[""], help="one extra override per setting ('' for none)")
    p.add_argument("--out", default=None, help="optional JSON file")
    args = p.parse_args()
    from conftest import compose_cfg
    from latentrl.config import validate

    settings = [(n, v) for v in args.variants for n in args.num_envs]
    cfgs = {}
    for n, v in settings:
        cfgs[n, v] = compose_cfg([*args.overrides, f"env.vector_mode={args.vector_mode}", *([v] if v else [])])
        validate(cfgs[n, v])
    name = {(n, v): f"num_envs={n:2d}" + (f" {v}" if v else "") for n, v in settings}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    runs = {s: [] for s in settings}
    for r in range(args.rounds):
        for s in (settings if r % 2 == 0 else settings[::-1]):
            runs[s].append(steps_per_s(cfgs[s].env, s[0], args.seconds, seed=r))
            print(f"round {r}: {name[s]} {runs[s][-1]:7.1f} agent steps/s", flush=True)
    med = {s: statistics.median(v) for s, v in runs.items()}
    first = settings[0]
    repeat = cfgs[first].env.action_repeat
    for s in settings:
        print(f"{name[s]}: {med[s]:7.1f} agent steps/s (x{repeat} frames), {med[s] / med[first]:.2f}x {name[first]}")
    print(f"load average at the start: {load:.1f} on {os.cpu_count()} cores (other processes share the machine)")
    if args.out:
        report = {"overrides": args.overrides, "vector_mode": args.vector_mode, "seconds": args.seconds,
                  "rounds": args.rounds, "load_average": load, "cores": os.cpu_count(),
                  "steps_per_s": {name[s].strip(): v for s, v in runs.items()},
                  "median": {name[s].strip(): v for s, v in med.items()},
                  "ratio_to_first": {name[s].strip(): med[s] / med[first] for s in settings}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
