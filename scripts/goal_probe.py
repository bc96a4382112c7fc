"""Probe a goal_hrl checkpoint: does its worker follow goals, and could it?

    python scripts/goal_probe.py outputs/<date>/<run>                 # prints, and writes goal_probe.json there
    python scripts/goal_probe.py outputs/<date>/<run> --states 256 --goals 16 --out probe.json

The run's `goal/` metrics say whether windows end nearer their goals; this says why not. From replay
states (the checkpoint's buffers.pt) it measures:
- goal sensitivity: how much the worker's deterministic action varies across `--goals` random manager
  goals at one state, against how much it varies across states (a worker that ignores its goal: ~0);
- controllability: the spread of f's k-step latent endpoints under random constant actions, against
  the typical k-step latent motion (~0: the actions cannot move the goal space);
- f's predicted relative success of the worker on those goals (the window metric, in f's rollouts);
- the k-step latent motion in replay by position in the episode (a heavy tail, such as CarRacing's
  episode-start zoom, sets a mean-based goal reach and reward spread);
- the goal reward's distances in a worker batch: median, 99th percentile, std;
- the worker's steps in that batch: how well they aim at their goals (cosine of E(s') - E(s) with
  g - E(s)), the distance reward's progress for small and large steps (a negative progress for large
  steps means the distance reward taxes moving), and how much more the latent moves on the steps the
  env pays more for (CarRacing: a step that gains a tile moves it 3-9x a median step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import locate  # noqa: E402  (the run/checkpoint loader evaluate.py uses)

from latentrl import checkpoint as ckpt_io  # noqa: E402
from latentrl.agents.goal_hrl import GoalHRL, direction_reward, goal_distance  # noqa: E402
from latentrl.config import ConfigError  # noqa: E402
from latentrl.envs import make_env  # noqa: E402
from latentrl.trainer import build_agent  # noqa: E402

EPISODE_SPANS = [(0, 1), (1, 2), (2, 5), (5, 15), (15, None)]  # window starts, in windows from the episode start


def load(path: Path) -> GoalHRL:
    run_dir, ckpt_file, cfg, state = locate(path)
    env = make_env(cfg.env)
    agent = build_agent(cfg, env, torch.device("cpu"), int(cfg.seed))
    if not isinstance(agent, GoalHRL):
        raise ConfigError(f"{path} is a {type(agent).__name__} run: goal_probe reads agent=goal_hrl runs")
    agent.load_checkpoint_state(state["agent"])
    buffers = ckpt_file.parent / "buffers.pt"
    if not buffers.exists():
        raise ConfigError(f"{buffers} is missing: the probe samples replay states (run with trainer.save_buffer=true)")
    saved = ckpt_io.load(buffers)
    for name, buf in agent.buffers().items():
        buf.load_state_dict(saved["buffers"][name])
    return agent


def step_stats(z: torch.Tensor, z_next: torch.Tensor, goal: torch.Tensor, env_reward: torch.Tensor) -> dict:
    """Worker steps s -> s' under goal g, from EMA latents: aim (cosine of the step with g - z), the
    distance reward's progress ||z - g||^2 - ||z' - g||^2 for steps below the median size and in the
    top quartile, and the median step size where the env reward is above its median / overall (CarRacing:
    the steps that gain a tile; most steps pay the same -0.1 per frame). nan when no step pays more."""
    cos = direction_reward(z, z_next, goal)  # reward=direction's own measure of aim
    msq = goal_distance(z_next, z)
    progress = goal_distance(z, goal) - goal_distance(z_next, goal)
    small, large = msq <= msq.median(), msq >= msq.quantile(0.75)
    env_reward = env_reward.reshape(-1)
    paid = env_reward > env_reward.median()
    return {"cos_to_goal": float(cos.mean()), "msq_median": float(msq.median()),
            "progress_small_steps": float(progress[small].mean()), "progress_large_steps": float(progress[large].mean()),
            "msq_paid_over_median": float(msq[paid].median() / msq.median().clamp_min(1e-12)) if paid.any() else float("nan")}


@torch.no_grad()
def probe(agent: GoalHRL, n_states: int = 128, n_goals: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rb, k, d = agent.replay, agent.k, agent.goal_dim
    # states with k more steps of the same episode behind them
    cand = rng.integers(0, max(1, rb.size - k), 8 * n_states)
    cand = cand[(rb.episode[(cand + k) % rb.capacity] == rb.episode[cand]) & rb.valid[cand]]
    idx = cand[:n_states]
    if len(idx) < 2:
        raise ConfigError("the replay holds fewer than 2 states with a full window ahead: probe a longer run")
    n = len(idx)
    obs = rb.obs_at(idx, "cpu")
    h, g = agent.goal_encoder(obs)
    z = agent.target_goals(obs)[1]
    z_next = agent.target_goals(rb.obs_at((idx + k) % rb.capacity, "cpu"))[1]
    motion = float(agent.k_step_motion) if agent.motion.ready else float("nan")

    # goal sensitivity: the worker's action at one state under random manager goals
    u = torch.as_tensor(rng.uniform(-1, 1, (n, n_goals, d)), dtype=torch.float32)
    zz = z.unsqueeze(1).expand(-1, n_goals, -1).reshape(n * n_goals, d)
    goals = agent.goal_from_action(zz, u.reshape(n * n_goals, d))
    hh = h.unsqueeze(1).expand(-1, n_goals, -1).reshape(n * n_goals, -1)
    act = agent.low.act(agent.worker_input(hh, goals, zz), explore=False).reshape(n, n_goals, -1)
    var_goals = act.var(1).mean(0)
    var_states = act.mean(1).var(0)

    # f's k-step rollouts: under the worker on those goals, and under random constant actions
    def rollout(action_fn):
        gg, hr = g.unsqueeze(1).expand(-1, n_goals, -1).reshape(n * n_goals, d), hh
        for _ in range(k):
            gg, hr = agent.f(gg, hr, action_fn(gg, hr))
        return gg

    end = rollout(lambda gg, hr: agent.low.act(agent.worker_input(hr, goals, gg), explore=False))
    start_d, end_d = goal_distance(zz, goals), goal_distance(end, goals)
    success = (end_d < agent.success_ratio * start_d).float().reshape(n, n_goals)
    const = torch.as_tensor(rng.uniform(-1, 1, (n * n_goals, agent.action_dim)), dtype=torch.float32)
    end_const = rollout(lambda gg, hr: const).reshape(n, n_goals, d)

    # real k-step motion by position in the episode (windows since the episode's first step)
    ep = rb.episode[idx]
    first = {e: int(np.flatnonzero(rb.episode[:rb.size] == e).min()) for e in np.unique(ep)}
    window = np.array([(i - first[e]) // k for i, e in zip(idx, ep)])
    msq = goal_distance(z_next, z).numpy()
    by_position = {}
    for lo, hi in EPISODE_SPANS:
        sel = (window >= lo) & (window < (hi if hi is not None else np.inf))
        if sel.any():
            by_position[f"windows {lo}-{hi - 1 if hi else 'end'}"] = {
                "n": int(sel.sum()), "mean_msq": float(msq[sel].mean()), "median_msq": float(np.median(msq[sel]))}

    # the goal reward's distances in a worker batch (stored and relabeled goals as trained)
    b = agent.sample_low()
    z_b, z_b_next = agent.target_goals(b["obs"])[1], agent.target_goals(b["next_obs"])[1]
    dist = goal_distance(z_b_next, b["goal"])
    return {
        "states": n, "goals_per_state": n_goals, "goal_dim": d, "k": k,
        "k_step_motion": motion, "goal_scale": float(agent.goal_scale),
        "action_var_across_goals": var_goals.tolist(), "action_var_across_states": var_states.tolist(),
        "goal_sensitivity": float(var_goals.sum() / var_states.sum().clamp_min(1e-12)),
        "f_endpoint_spread_constant_actions": float(end_const.var(1).mean()),
        "f_endpoint_spread_worker_goals": float(end.reshape(n, n_goals, d).var(1).mean()),
        "k_step_motion_sq": motion ** 2,
        "f_relative_success": float(success.mean()),
        "f_relative_success_best_goal": float(success.max(1).values.mean()),
        "replay_k_step_msq": {"mean": float(msq.mean()), "median": float(np.median(msq)),
                              "p99": float(np.percentile(msq, 99))},
        "replay_k_step_msq_by_position": by_position,
        "goal_distance_batch": {"median": float(dist.median()), "p99": float(dist.quantile(0.99)),
                                "std": float(dist.std())},
        "worker_steps": step_stats(z_b, z_b_next, b["goal"], b["reward"]),
    }


def report(r: dict) -> str:
    lines = [
        f"{r['states']} replay states x {r['goals_per_state']} random goals; goal_dim {r['goal_dim']}, k {r['k']}",
        f"k-step motion (RMS per dim, the agent's estimate) {r['k_step_motion']:.4f}; goal_scale {r['goal_scale']:.4f}",
        f"worker action variance across goals {np.round(r['action_var_across_goals'], 4).tolist()} vs across states "
        f"{np.round(r['action_var_across_states'], 4).tolist()} (goal sensitivity {r['goal_sensitivity']:.3f}; 0: goal ignored)",
        f"f's k-step endpoint spread: random constant actions {r['f_endpoint_spread_constant_actions']:.2e}, the worker "
        f"over goals {r['f_endpoint_spread_worker_goals']:.2e}, vs motion^2 {r['k_step_motion_sq']:.2e}",
        f"f-predicted relative success {r['f_relative_success']:.3f} (best goal of each state {r['f_relative_success_best_goal']:.3f})",
        "replay k-step motion msq: mean {mean:.2e}, median {median:.2e}, p99 {p99:.2e}".format(**r["replay_k_step_msq"]),
    ]
    for span, v in r["replay_k_step_msq_by_position"].items():
        lines.append(f"  {span}: n={v['n']}, mean {v['mean_msq']:.2e}, median {v['median_msq']:.2e}")
    lines.append("goal-reward distance in a worker batch: median {median:.2e}, p99 {p99:.2e}, std {std:.2e}".format(
        **r["goal_distance_batch"]))
    lines.append("worker steps: cos to goal {cos_to_goal:.3f}; distance-reward progress small steps {progress_small_steps:.2e}, "
                 "large steps {progress_large_steps:.2e}; step msq median {msq_median:.2e}, x{msq_paid_over_median:.1f} on the "
                 "steps the env pays above its median".format(**r["worker_steps"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="a goal_hrl run directory or its checkpoints/last.pt")
    p.add_argument("--states", type=int, default=128, help="replay states probed")
    p.add_argument("--goals", type=int, default=16, help="random manager goals per state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON (default: goal_probe.json in the run directory)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        agent = load(args.path)
        result = probe(agent, args.states, args.goals, args.seed)
    except (ConfigError, ckpt_io.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    run_dir = locate(args.path)[0]
    out = args.out or run_dir / "goal_probe.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
