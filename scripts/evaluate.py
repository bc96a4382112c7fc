"""Evaluate a trained run: rebuild env + encoder + agent from the run's saved config, load the
checkpoint's weights and play N deterministic episodes.

    python scripts/evaluate.py outputs/<date>/<run> --episodes 10 --video eval.mp4
    python scripts/evaluate.py path/to/checkpoints/last.pt --seed 123 --out eval.json

By default the episodes are seeded exactly like the trainer's own evaluation (run seed, eval seed
stream), so `--episodes trainer.eval_episodes` reproduces the run's final eval/return_mean; pass
--seed for fresh, unseen episodes. Replay buffers are not needed and not loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

import latentrl  # noqa: F401  (registers the config resolvers a saved config may still mention)
from latentrl import checkpoint as ckpt_io
from latentrl.config import ConfigError, to_plain
from latentrl.envs import episode_seed, make_env
from latentrl.trainer import EVAL_STREAM, build_agent, resolve_device, run_episode


def locate(path: Path) -> tuple[Path, Path, DictConfig, dict]:
    """(run_dir, checkpoint file, config, checkpoint state) for a run directory or a .pt file.
    A run directory is rebuilt from its config.yaml; a bare checkpoint from the config inside it."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist: pass a run directory (outputs/<date>/<run>) or a checkpoint .pt")
    if path.is_dir():
        ckpt_file, cfg_file = path / "checkpoints" / "last.pt", path / "config.yaml"
        if not cfg_file.exists() or not ckpt_file.exists():
            raise ConfigError(f"{path} is not a latentrl run directory with a checkpoint (it needs config.yaml and "
                              "checkpoints/last.pt): pass the directory train.py printed as 'run directory'")
        state = ckpt_io.load(ckpt_file)
        cfg = OmegaConf.load(cfg_file)
        run_dir = path
    else:
        ckpt_file = path
        try:
            state = ckpt_io.load(ckpt_file)
        except ckpt_io.CheckpointError:
            raise ConfigError(f"{path} is not a checkpoint torch can read: pass <run_dir>/checkpoints/last.pt "
                              "or the run directory") from None
        if not isinstance(state, dict) or "config" not in state or "agent" not in state:
            raise ConfigError(f"{path} is not a latentrl checkpoint (no 'config'/'agent' inside): pass "
                              "<run_dir>/checkpoints/last.pt or the run directory")
        cfg = OmegaConf.create(state["config"])
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    ckpt_io.check_compatible(state, to_plain(cfg), ckpt_file)
    return run_dir, ckpt_file, cfg, state


def save_video(frames: list[np.ndarray], out: Path, fps: float) -> None:
    """mp4 through imageio's ffmpeg plugin (the imageio-ffmpeg wheel ships its own ffmpeg binary);
    a .gif needs only Pillow."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(out, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise ConfigError("--video *.mp4 needs imageio and imageio-ffmpeg: pip install imageio imageio-ffmpeg "
                          "(or pass a .gif path)") from None
    # yuv420p, the pixel format every player reads, needs even sides: pad by one row/column if needed
    h, w = frames[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    with imageio.get_writer(out, fps=fps, codec="libx264", macro_block_size=1, pixelformat="yuv420p") as writer:
        for f in frames:
            writer.append_data(np.pad(f, pad, mode="edge") if h % 2 or w % 2 else f)


def evaluate(path: Path, episodes: int, seed: int | None = None, video: Path | None = None,
             device: str = "cpu") -> dict:
    run_dir, ckpt_file, cfg, state = locate(path)
    seed = int(cfg.seed) if seed is None else seed
    env = make_env(cfg.env, render_mode="rgb_array" if video else None)
    agent = build_agent(cfg, env, resolve_device(device), seed)
    try:
        agent.load_checkpoint_state(state["agent"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ckpt_io.CheckpointError(f"{ckpt_file} does not fit the agent built from its config "
                                      f"({type(e).__name__}: {str(e).splitlines()[0]})") from None

    seeds = [episode_seed(seed, i, EVAL_STREAM) for i in range(episodes)]
    returns, lengths, successes, frames = [], [], [], []
    for i, s in enumerate(seeds):
        ret, length, success = run_episode(agent, env, s, frames if (video and i == 0) else None)
        returns.append(ret)
        lengths.append(length)
        successes.append(success)
        print(f"episode {i}: return {ret:.1f} ({length} steps{'' if success is None else f', success {success}'})")
    env.close()
    agent_metrics = agent.eval_metrics()  # goal_hrl: how the deterministic windows reached their goals
    for key, value in agent_metrics.items():
        print(f"{key}: {value:.4g}")
    if video:
        fps = float(env.metadata.get("render_fps") or 30) / max(1, int(cfg.env.action_repeat))
        save_video(frames, video, fps)
    return {"run_dir": str(run_dir), "checkpoint": str(ckpt_file), "env": cfg.env.id, "agent": cfg.agent._target_,
            "step": state.get("counters", {}).get("step"), "seed": seed, "episodes": episodes,
            "episode_seeds": seeds, "returns": returns, "lengths": lengths,
            "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "success_rate": None if None in successes else float(np.mean(successes)),
            "agent_metrics": agent_metrics, "video": str(video) if video else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="run directory or checkpoint file (.pt)")
    p.add_argument("--episodes", type=int, default=10, help="deterministic episodes to play (default 10)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the episode resets (default: the run's seed = the episodes the trainer evaluated)")
    p.add_argument("--video", type=Path, default=None, help="save the first episode as .mp4 (or .gif)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: <run_dir>/eval.json)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes must be >= 1")
    try:
        result = evaluate(args.path, args.episodes, args.seed, args.video, args.device)
    except (ConfigError, ckpt_io.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path(result["run_dir"]) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    success = "" if result["success_rate"] is None else f", success rate {result['success_rate']:.2f}"
    print(f"{result['env']}: return {result['return_mean']:.1f} ± {result['return_std']:.1f}{success} over "
          f"{args.episodes} episodes (checkpoint step {result['step']}); results in {out}")
    if args.video:
        print(f"video: {args.video}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering, as make_env does; a user's choice wins
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame (classic control, Box2D) without a display
    sys.exit(main())
