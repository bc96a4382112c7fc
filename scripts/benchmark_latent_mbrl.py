"""Cost of one latent_mbrl env step (acting + one update) as a ratio to one `sac` env step, both
measured in the same process on the same env.

    .venv/bin/python scripts/benchmark_latent_mbrl.py experiment=latent_mbrl_halfcheetah [agent.policy_learning=none ...]

Builds both agents from the Hydra config (the overrides apply to latent_mbrl; the reference is
`agent=sac encoder=identity` with its default settings on the same env), fills each replay with the same random transitions,
then times an env step with acting and one update() call, and each policy_learning mode's update.
Prints a table and writes JSON (`--out`, default outputs/benchmark_latent_mbrl.json). Run it on an
idle machine: anything else running skews the ratios."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import compose_cfg  # noqa: E402  (the same config composition as train.py)

from latentrl.agents.sac import SAC  # noqa: E402
from latentrl.encoders import IdentityEncoder  # noqa: E402
from latentrl.envs import make_env  # noqa: E402


def build(overrides: list[str]):
    cfg = compose_cfg(overrides)
    env = make_env(cfg.env)
    encoder = instantiate(cfg.encoder, obs_space=env.observation_space)
    agent = instantiate(cfg.agent, encoder=encoder, obs_space=env.observation_space,
                        action_space=env.action_space, device="cpu", seed=0, _recursive_=False)
    return cfg, env, agent


def fill(agent, env, n: int) -> np.ndarray:
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(n):
        a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        agent.observe(obs, a, float(r), nxt, term, trunc)
        obs = env.reset()[0] if term or trunc else nxt
    return obs


def env_step_cost(agent, env, obs, reps: int) -> float:
    """Seconds per training env step: act, step the env, store, one update (trainer.updates_per_step=1)."""
    def one():
        nonlocal obs
        a = agent.act(obs, explore=True)
        nxt, r, term, trunc, _ = env.step(a)
        agent.observe(obs, a, float(r), nxt, term, trunc)
        obs = env.reset()[0] if term or trunc else nxt
        agent.update(0)

    one()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        one()
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for latent_mbrl, e.g. experiment=latent_mbrl_hopper")
    p.add_argument("--fill", type=int, default=5000, help="random transitions in each replay before timing")
    p.add_argument("--reps", type=int, default=200, help="timed env steps per agent")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmark_latent_mbrl.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = ["agent=latent_mbrl", *args.overrides]
    if not any(o.startswith(("env=", "experiment=")) for o in args.overrides):
        overrides.append("env=halfcheetah")

    cfg = compose_cfg(overrides)  # only for the env: no agent is built here
    sac_env = make_env(cfg.env)  # SAC with conf/agent/sac.yaml's defaults on raw states, on the same env
    ms = {}
    sac = SAC(IdentityEncoder(sac_env.observation_space), sac_env.observation_space, sac_env.action_space,
              buffer_size=args.fill + 10 * args.reps)
    ms["sac"] = 1e3 * env_step_cost(sac, sac_env, fill(sac, sac_env, args.fill), args.reps)
    for mode in ("svg", "mbpo", "none"):
        _, menv, agent = build([*overrides, f"agent.policy_learning={mode}"])
        ms[f"latent_mbrl_{mode}"] = 1e3 * env_step_cost(agent, menv, fill(agent, menv, args.fill), args.reps)
    res = {"env": sac_env.spec.id, "threads": args.threads, "overrides": overrides, "reps": args.reps,
           "ms_per_env_step": ms, "ratio_to_sac": {k: v / ms["sac"] for k, v in ms.items()}}
    for k, v in ms.items():
        print(f"{k:20s} {v:8.2f} ms per env step  {res['ratio_to_sac'][k]:5.2f} x sac")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print("written", args.out)


if __name__ == "__main__":
    os.environ.setdefault("MUJOCO_GL", "egl")
    main()
