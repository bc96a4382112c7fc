"""Training-loop throughput on one device: latentrl SAC (states and pixels) for several env.num_envs,
agent.compile off and on, beside stable-baselines3's SAC on the same device and envs in the same
run. Prints env steps/s and updates/s of each and our ratio to SB3, and writes them to JSON.

    python scripts/benchmark_gpu.py [--device auto] [--steps 2000] [--num-envs 1 4 16] [--compile off on]
                                    [--tasks state pixel] [--out bench_results/gpu_throughput.json]

Both sides do one update per env step summed over sub-envs (N envs: N updates per iteration; SB3's
gradient_steps=-1), from the same env (latentrl's make_env, so SB3 sees the same wrappers), with
async sub-envs for pixels and in-process ones for states. Each measurement runs three windows of
`--steps` env steps: random warm-up, a first stretch of updates (where torch.compile compiles),
then the measured one. SB3 needs the `bench` extra (pip install -e '.[bench]'); without it only our
side is measured. SB3's CnnPolicy is its NatureCNN, not our encoder=cnn: pixel ratios compare
the two libraries as shipped, not identical networks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # reuse the test helper that composes configs like train.py

TASKS = {  # overrides shared by both libraries' env and our agent
    "state": ["env=halfcheetah", "agent=sac", "encoder=identity"],
    "pixel": ["experiment=sac_carracing"],  # CarRacing 48x48 grayscale, 3 stacked, action repeat 4; batch 128
}


def ours(task: str, num_envs: int, compile_: bool, steps: int, device: str, threads: int, seed: int = 0) -> dict:
    """The real training loop; its perf/ metrics over the last window (after warm-up and the first updates)."""
    from conftest import compose_cfg
    from latentrl.train import run

    with tempfile.TemporaryDirectory() as d:
        run(compose_cfg([*TASKS[task], f"seed={seed}", f"device={device}", f"threads={threads}", f"env.num_envs={num_envs}",
                         f"agent.compile={str(compile_).lower()}", f"agent.buffer_size={3 * steps + num_envs}",
                         f"trainer.total_steps={3 * steps}", f"trainer.warmup_steps={steps}",
                         "trainer.updates_per_step=1", f"trainer.log_every={steps}", "trainer.eval_every=0",
                         "trainer.eval_episodes=0", "trainer.checkpoint_every=0", "trainer.save_buffer=false",
                         "trainer.progress=false"]), run_dir=d)
        lines = [json.loads(ln) for ln in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in lines if "perf/env_steps_per_s" in m][-1]
    return {"env_steps_per_s": last["perf/env_steps_per_s"], "updates_per_s": last["perf/updates_per_s"]}


def sb3(task: str, num_envs: int, steps: int, device: str, seed: int = 0) -> dict | None:
    """SB3's SAC on the same env and budget, timed over the same last window; None without SB3."""
    try:
        from stable_baselines3 import SAC
        from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
    except ImportError:
        return None
    from conftest import compose_cfg
    from latentrl.config import validate
    from latentrl.envs import make_env

    cfg = compose_cfg(TASKS[task])
    validate(cfg)
    fns = [lambda: make_env(cfg.env) for _ in range(num_envs)]
    venv = SubprocVecEnv(fns) if cfg.env.pixels and num_envs > 1 else DummyVecEnv(fns)
    model = SAC("CnnPolicy" if cfg.env.pixels else "MlpPolicy", venv, learning_starts=steps,
                batch_size=int(cfg.agent.batch_size), buffer_size=3 * steps + num_envs, train_freq=1,
                gradient_steps=-1, seed=seed, device=device, verbose=0)
    try:
        model.learn(2 * steps)
        start, before = time.perf_counter(), model.num_timesteps
        model.learn(steps, reset_num_timesteps=False)
        seconds, done = time.perf_counter() - start, model.num_timesteps - before
    finally:
        venv.close()
    return {"env_steps_per_s": done / seconds, "updates_per_s": done / seconds}  # one update per env step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    p.add_argument("--steps", type=int, default=2000, help="env steps per window (3 windows per measurement)")
    p.add_argument("--num-envs", type=int, nargs="+", default=[1, 4, 16], help="env.num_envs values")
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"], help="agent.compile values")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads for both")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "gpu_throughput.json"))
    args = p.parse_args()
    import conftest  # noqa: F401  (sets its own thread count on import: set ours after it)

    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows, ratios = [], []
    for task in args.tasks:
        for n in args.num_envs:
            steps = -(-args.steps // n) * n  # whole iterations of n sub-envs
            base = sb3(task, n, steps, device)
            if base is None:
                print("stable-baselines3 is not installed (pip install -e '.[bench]'): measuring latentrl only")
            else:
                rows.append({"task": task, "num_envs": n, "library": "sb3", "compile": None, **base})
                print(f"{task:5s} N={n:2d} sb3               {base['env_steps_per_s']:8.1f} env steps/s "
                      f"{base['updates_per_s']:8.1f} updates/s", flush=True)
            for mode in args.compile:
                m = ours(task, n, mode == "on", steps, device, args.threads)
                torch.set_num_threads(args.threads)
                rows.append({"task": task, "num_envs": n, "library": "latentrl", "compile": mode == "on", **m})
                ratio = m["env_steps_per_s"] / base["env_steps_per_s"] if base else None
                print(f"{task:5s} N={n:2d} latentrl compile={mode:3s} {m['env_steps_per_s']:8.1f} env steps/s "
                      f"{m['updates_per_s']:8.1f} updates/s" + (f"  {ratio:.2f}x sb3" if ratio else ""), flush=True)
                if ratio:
                    ratios.append({"task": task, "num_envs": n, "compile": mode == "on", "env_steps_ratio": ratio})
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    report = {"device": device, "gpu": gpu, "torch": torch.__version__, "threads": args.threads,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "steps_per_window": args.steps, "results": rows, "ratios_to_sb3": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
