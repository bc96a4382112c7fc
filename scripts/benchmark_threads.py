"""Torch CPU threads vs SAC update throughput, alone and while other processes keep the cores busy:
the measurement behind the `threads: null` (= 1 thread) default in conf/config.yaml.

Each setting runs in a fresh process (torch's OpenMP pool and OMP_WAIT_POLICY are fixed at start-up)
doing HalfCheetah-sized SAC updates (17-dim observations, 6-dim actions, 256x256 MLPs, batch 256)
from a replay buffer of random transitions, so only the update is timed. "Shared" starts one
spinning Python process per usable core first, like a second experiment on the same machine.

    python scripts/benchmark_threads.py [--threads 1 2] [--seconds 20] [--wait-policies default PASSIVE]
                                        [--out bench_results/threads.json]
Takes len(threads) x len(wait policies) x 2 x (seconds + start-up); run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker(threads: int, seconds: float, warmup_updates: int) -> dict:
    """Updates per second of one SAC agent with `threads` torch threads (run in its own process)."""
    import gymnasium as gym
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import compose_cfg  # composes configs exactly like train.py
    from latentrl.trainer import build

    torch.set_num_threads(threads)
    cfg = compose_cfg(["env=halfcheetah", "agent=sac", "encoder=identity", "device=cpu", "agent.buffer_size=20000"])
    obs_space = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)
    encoder = build(cfg.encoder, "encoder", obs_space=obs_space)
    agent = build(cfg.agent, "agent", encoder=encoder, obs_space=obs_space, action_space=action_space,
                  device="cpu", seed=0, _recursive_=False)
    rng = np.random.default_rng(0)
    for i in range(5000):
        agent.observe(rng.standard_normal(17).astype(np.float32), rng.uniform(-1, 1, 6).astype(np.float32),
                      float(rng.standard_normal()), rng.standard_normal(17).astype(np.float32), False, i % 1000 == 999)
    for step in range(warmup_updates):
        agent.update(step)
    updates, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        agent.update(warmup_updates + updates)
        updates += 1
    elapsed = time.perf_counter() - start
    return {"threads": threads, "updates": updates, "seconds": round(elapsed, 2),
            "updates_per_s": round(updates / elapsed, 1)}


def spin() -> None:
    """A busy competitor: one core's worth of pure-Python work until terminated."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def measure(threads: int, seconds: float, warmup_updates: int, wait_policy: str, shared: bool) -> dict:
    busy = [mp.Process(target=spin, daemon=True) for _ in range(usable_cores() if shared else 0)]
    for p in busy:
        p.start()
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(threads), str(seconds), str(warmup_updates)],
                              env=env, capture_output=True, text=True, check=True)
    finally:
        for p in busy:
            p.terminate()
            p.join()
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wait_policy": wait_policy, "shared": shared, "busy_processes": len(busy)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, usable_cores()}),
                   help="torch thread counts to compare (default: 1 and every usable core)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per setting")
    p.add_argument("--warmup-updates", type=int, default=50, help="untimed updates first (allocations, caches)")
    p.add_argument("--wait-policies", nargs="+", default=["default", "PASSIVE"],
                   help="OMP_WAIT_POLICY values ('default' leaves it unset); PASSIVE stops idle threads spinning")
    p.add_argument("--no-shared", action="store_true", help="skip the runs beside busy processes")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "threads.json"))
    args = p.parse_args()

    rows = []
    for policy in args.wait_policies:
        for shared in (False,) if args.no_shared else (False, True):
            for threads in args.threads:
                row = measure(threads, args.seconds, args.warmup_updates, policy, shared)
                rows.append(row)
                print(f"threads={threads} OMP_WAIT_POLICY={policy:8s} {'shared' if shared else 'alone':6s} "
                      f"{row['updates_per_s']:7.1f} updates/s", flush=True)
    report = {"workload": "SAC update, HalfCheetah sizes (17 obs, 6 actions, 256x256, batch 256)",
              "machine": f"{platform.processor() or platform.machine()}, {usable_cores()} usable cores",
              "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "seconds_per_setting": args.seconds, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
