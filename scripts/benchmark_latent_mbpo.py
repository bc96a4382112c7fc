"""Cost of latent_mbpo's update cycle per env step, against a plain SAC update measured in the same run.

    .venv/bin/python scripts/benchmark_latent_mbpo.py env=halfcheetah [agent.updates_per_step=10 ...]

Builds the agent from the Hydra config (any overrides), fills the real replay with random-action
transitions, then times: one model gradient step (x model_train_steps / model_train_every = amortised
per env step), one rollout batch, one SAC update on latents, the whole update() call, and a plain
`agent=sac` update on the same env. Prints a table and writes JSON (`--out`, default
outputs/benchmark_latent_mbpo.json)."""

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

from latentrl.envs import make_env  # noqa: E402


def build(overrides: list[str]):
    cfg = compose_cfg(overrides)
    env = make_env(cfg.env)
    encoder = instantiate(cfg.encoder, obs_space=env.observation_space)
    agent = instantiate(cfg.agent, encoder=encoder, obs_space=env.observation_space,
                        action_space=env.action_space, device="cpu", seed=0, _recursive_=False)
    return cfg, env, agent


def fill(agent, env, n: int) -> None:
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(n):
        a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        agent.observe(obs, a, float(r), nxt, term, trunc)
        obs = env.reset()[0] if term or trunc else nxt


def timeit(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. env=halfcheetah agent.updates_per_step=10")
    p.add_argument("--fill", type=int, default=5000, help="random transitions in the replay before timing")
    p.add_argument("--reps", type=int, default=20, help="repetitions per timed piece")
    p.add_argument("--sac-overrides", nargs="*", default=["encoder=identity"],
                   help="extra overrides of the reference SAC (default: state SAC, encoder=identity)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmark_latent_mbpo.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg, env, agent = build(["agent=latent_mbpo", *args.overrides])
    fill(agent, env, args.fill)
    agent.model_init_train_steps = agent.model_train_steps
    agent.train_model()  # normaliser, elites, a first model buffer
    agent.rollout(agent.rollouts_per_step)
    train_idx, _ = agent._split()

    def model_step():
        b = agent.replay.gather(train_idx[agent.np_rng.integers(0, len(train_idx), agent.model_batch_size)])
        loss, _, _ = agent.model_loss(b)
        agent.model_opt.zero_grad(set_to_none=True)
        loss.backward()
        agent.model_opt.step()

    saved_g = agent.updates_per_step
    agent.updates_per_step = 1
    t_sac_latent = timeit(agent.update_policy, args.reps * 5)
    agent.updates_per_step = saved_g
    t_model = timeit(model_step, args.reps)
    t_rollout = timeit(lambda: agent.rollout(agent.rollouts_per_step), args.reps)
    t_policy = timeit(agent.update_policy, args.reps)
    agent.last_retrain_step = agent.env_steps  # a plain cycle (no retrain) ...
    t_cycle_no_retrain = timeit(lambda: agent.update(agent.env_steps), args.reps)
    model_per_step = t_model * agent.model_train_steps / agent.model_train_every  # ... plus the amortised retrain
    t_cycle = t_cycle_no_retrain + model_per_step

    env_name = cfg.env.id
    _, sac_env, sac = build(["agent=sac", *[o for o in args.overrides if not o.startswith("agent.")],
                              *args.sac_overrides])
    fill(sac, sac_env, args.fill)
    t_sac = timeit(lambda: sac.update(0), args.reps * 5)

    res = {
        "env": env_name, "sac_overrides": args.sac_overrides, "threads": args.threads, "overrides": args.overrides,
        "updates_per_step": agent.updates_per_step, "rollouts_per_step": agent.rollouts_per_step,
        "rollout_length": agent.rollout_length(), "model_train_steps": agent.model_train_steps,
        "model_train_every": agent.model_train_every,
        "ms": {"sac_update_plain": 1e3 * t_sac, "sac_update_on_latents": 1e3 * t_sac_latent,
               "model_grad_step": 1e3 * t_model, "model_training_per_env_step": 1e3 * model_per_step,
               "rollouts_per_env_step": 1e3 * t_rollout, "policy_updates_per_env_step": 1e3 * t_policy,
               "update_cycle_per_env_step": 1e3 * t_cycle},
    }
    res["ratio_to_plain_sac_update"] = {k: v / res["ms"]["sac_update_plain"] for k, v in res["ms"].items()}
    res["env_steps_30k_hours_estimate"] = 30_000 * t_cycle / 3600
    for k, v in res["ms"].items():
        print(f"{k:32s} {v:9.2f} ms  {res['ratio_to_plain_sac_update'][k]:6.2f} x plain SAC update")
    print(f"30k env steps of updates: ~{res['env_steps_30k_hours_estimate']:.2f} h (update work only)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print("written", args.out)


if __name__ == "__main__":
    os.environ.setdefault("MUJOCO_GL", "egl")
    main()
