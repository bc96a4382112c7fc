"""The training loop: collect, store, update, evaluate, log, checkpoint, resume.

It builds the parts from the config and drives them through the `Agent` interface; it knows no
algorithm. Resume is exact on CPU: networks, optimizers, buffers, RNG states and counters are
restored, and the env is brought back mid-episode by replaying that episode's actions from its
seeded reset.

With env.num_envs = N > 1 the trainer steps N sub-envs per iteration (envs/vector.py): steps,
trainer.total_steps and every interval count agent steps summed over sub-envs (sub-env i's
transition in an iteration is step `step + i + 1`), trainer.updates_per_step is per agent step (N
envs x 1 update/step = N updates per iteration), each sub-env's episodes are logged, seeded and
rebuilt on resume on their own, and evaluation still runs one env.

Reliability: a run never fails silently. Logged metrics and, at every checkpoint, all parameters
and optimizer states are checked for NaN/inf; a diverged run stops with DivergenceError and keeps
its last finite checkpoint. SIGINT/SIGTERM are honoured between env steps, between updates and
between evaluation steps; agents with long loops inside `update()` poll `self.should_stop()`,
which the trainer sets on them (see `Trainer.train` and checkpoint.UpdateInterrupted)."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from latentrl import checkpoint as ckpt_io
from latentrl.config import ConfigError, DivergenceError, resume_command, to_plain, usable_cores
from latentrl.envs import episode_seed, make_env
from latentrl.envs.goal import GoalFunctions, describe_space, is_goal_space, map_obs, success_of
from latentrl.envs.vector import TrainEnvs
from latentrl.logging import Logger, strict_json

log = logging.getLogger("latentrl")

EVAL_STREAM = 1  # seed stream of evaluation episodes (training episodes use stream 0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_threads(requested: int | None) -> int:
    """torch CPU threads for this process. null means 1: on HalfCheetah's SAC update (issue 11's
    measurements on a 2-core machine; re-measure with scripts/benchmark_threads.py), 2 threads are
    ~25% faster than 1 when alone, but fall 5x (OpenMP threads spinning against each other) as soon
    as another process keeps the cores busy, while 1 thread keeps ~65% of its speed. Sweeps set
    `threads` to their share of cores (latentrl.train.sweep_job_defaults)."""
    threads = 1 if requested is None else int(requested)
    torch.set_num_threads(threads)
    how = "threads=null: 1, safe when other processes share the cores" if requested is None else f"threads={threads}"
    log.info("torch CPU threads: %d (%s)", threads, how)
    if threads > 1 and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], usable_cores()
        if load + threads > cores + 0.5:
            log.warning("threads=%d but the load average is %.1f on %d cores: other processes are busy, and "
                        "multi-threaded torch can run several times slower than threads=1 when cores are shared",
                        threads, load, cores)
    return threads


def metric_hint(cfg: DictConfig) -> str:
    """What to try after a divergence, naming this run's own learning rates and reward scales."""
    found = []

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and (
                    k == "lr" or k.endswith("_lr") or "reward_scale" in k):
                found.append(f"{prefix}{k}={v:g}")

    walk(to_plain(cfg.agent), "agent.")
    settings = f" (now {', '.join(found)})" if found else ""
    return (f"lower the learning rate or the reward scale{settings}; large rewards or targets also call for "
            "reward scaling or gradient clipping")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(node: DictConfig, group: str, **kwargs):
    """hydra.utils.instantiate, but a ConfigError raised by the part itself reaches the user as is,
    and a bad keyword names the config group instead of a deep stack trace."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, TypeError) and "argument" in str(cause):
            raise ConfigError(f"{group} config does not fit {node._target_}: {cause}. Check the {group}.* keys "
                              f"against conf/{group}/") from None
        raise


def check_vector_agent(cfg: DictConfig) -> None:
    """env.num_envs > 1 needs an agent that learns from several sub-envs at once (before any env
    worker process is started)."""
    n = cfg.env.num_envs
    if n > 1 and not getattr(get_class(cfg.agent._target_), "vector_envs", False):
        raise ConfigError(f"env.num_envs={n}: {cfg.agent._target_} keeps per-episode state and trains on one env; "
                          "set env.num_envs=1 (agent=sac and agent=latent_mbrl take vector envs)")


def build_agent(cfg: DictConfig, env, device: torch.device, seed: int):
    """Encoder + agent for `env`'s spaces (a single env). On a goal-conditioned env the agent also
    gets the env's goal reward functions (for hindsight relabeling); agents that cannot use goals
    are refused. With env.num_envs > 1 the agent keeps one replay stream per sub-env."""
    obs_space, action_space = env.observation_space, env.action_space
    num_envs = cfg.env.get("num_envs", 1)  # configs saved before vector envs (scripts/evaluate.py) lack it
    kwargs = {"num_envs": num_envs} if num_envs > 1 else {}
    if is_goal_space(obs_space):
        if not getattr(get_class(cfg.agent._target_), "goal_conditioned", False):
            raise ConfigError(f"{cfg.agent._target_} does not handle goal-conditioned envs (env.id={cfg.env.id}, "
                              "dict observations): use agent=sac (SAC + HER) or agent=goal_hrl")
        if num_envs > 1:
            raise ConfigError(f"env.num_envs={num_envs}: goal-conditioned envs (env.id={cfg.env.id}, dict "
                              "observations) train on one env; set env.num_envs=1")
        kwargs["goal_fns"] = GoalFunctions(env)
    log.info("building encoder %s", cfg.encoder._target_)
    encoder = build(cfg.encoder, "encoder", obs_space=obs_space)
    log.info("building agent %s on %s", cfg.agent._target_, device)
    return build(cfg.agent, "agent", encoder=encoder, obs_space=obs_space, action_space=action_space,
                 device=str(device), seed=seed, _recursive_=False, **kwargs)


def hparams_of(cfg: DictConfig) -> dict:
    """Flattened scalar settings of a run, for TensorBoard's HParams dashboard."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)):
                flat[f"{prefix}{k}"] = v
            elif isinstance(v, list):
                flat[f"{prefix}{k}"] = str(v)

    walk(to_plain(cfg), "")
    for k in ("resume", "trainer.progress", "device", "threads"):
        flat.pop(k, None)
    return flat


def run_episode(agent, env, seed: int, frames: list | None = None,
                should_stop=None) -> tuple[float, int, bool | None]:
    """One deterministic evaluation episode -> (return, length, success at its last step, or None
    when the env reports no success); appends rendered frames when a list is given.
    `should_stop()` is polled every step: a stop request ends the episode early (the caller
    discards it), so a SIGTERM during a long evaluation is honoured within a step."""
    agent.begin_episode(explore=False)
    obs, info = env.reset(seed=seed)
    done, ret, length = False, 0.0, 0
    while not done and not (should_stop is not None and should_stop()):
        if frames is not None:
            frames.append(env.render())
        obs, reward, terminated, truncated, info = env.step(agent.act(obs, explore=False))
        ret += float(reward)
        length += 1
        done = terminated or truncated
    return ret, length, success_of(info)


def due(interval: int, step: int, stepped: int) -> bool:
    """Whether the last `stepped` steps, ending at `step`, crossed a multiple of `interval`."""
    return interval > 0 and step // interval > (step - stepped) // interval


@dataclass
class Running:
    """A sub-env's running training episode: what logs it and what rebuilds it on resume."""
    episode: int = 0  # this sub-env's episode index (its position in its seed stream)
    actions: list = field(default_factory=list)  # actions so far, replayed from the seeded reset on resume
    ret: float = 0.0
    length: int = 0


def _as_before(signum: int, frame, handler) -> None:
    """Handle signum in a forked child the way the handler it replaced would have (the default: the
    signal's own action, e.g. SIGTERM ends the process; Python's: SIGINT raises KeyboardInterrupt)."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume: bool = False, branch_from: str | Path | None = None):
        # SIGINT/SIGTERM are honoured from here on: a stop that lands while the envs, the agent or a
        # checkpoint are still loading (a sweep stopped as its next job starts) ends train() at once
        # with a checkpoint to resume from, instead of killing a job that leaves nothing behind
        self.stop_requested, self._stop_time = False, 0.0
        self._old_handlers = self._install_signal_handlers()
        try:
            self._build(cfg, run_dir, resume, branch_from)
        except BaseException:
            self._restore_signal_handlers(self._old_handlers)
            raise

    def _build(self, cfg: DictConfig, run_dir: Path, resume: bool, branch_from: str | Path | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.t = cfg.trainer
        configure_threads(cfg.get("threads"))
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":  # cuDNN's fastest kernels can sum in any order: no exact resume
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

        self.num_envs = cfg.env.num_envs
        check_vector_agent(cfg)
        self.envs = TrainEnvs(cfg.env, self.num_envs)
        self.eval_env = make_env(cfg.env, render_mode="rgb_array" if self.t.log_eval_video else None)
        self.envs.action_space.seed(cfg.seed)
        single = self.envs.env if self.num_envs == 1 else self.eval_env  # a single env with the training spaces
        log.info("env %s: obs %s, action %s%s", getattr(single.unwrapped.spec, "id", cfg.env.id),
                 describe_space(single.observation_space), single.action_space.shape,
                 f", {self.num_envs} sub-envs ({type(self.envs.env).__name__})" if self.num_envs > 1 else "")
        if self.t.total_steps % self.num_envs:
            log.warning("trainer.total_steps=%d is not a multiple of env.num_envs=%d: the run ends at step %d",
                        self.t.total_steps, self.num_envs, -(-self.t.total_steps // self.num_envs) * self.num_envs)
        self.agent = build_agent(cfg, single, self.device, cfg.seed)
        for name, buf in self.agent.buffers().items():
            log.info("buffer '%s': capacity %d, %d bytes per transition (%.2f GiB when full)", name, buf.capacity,
                     buf.bytes_per_transition(), buf.capacity * buf.bytes_per_transition() / 2**30)

        # counters (all checkpointed)
        self.step = 0  # env steps taken (agent decisions, summed over sub-envs)
        self.episode = 0  # training episodes finished (all sub-envs)
        self.num_updates = 0
        self.update_credit = 0.0  # fractional updates_per_step accumulate here
        self.wall_time = 0.0  # seconds trained, summed over resumes
        self.running = [Running() for _ in range(self.num_envs)]  # each sub-env's running episode
        self.last_return = float("nan")
        self.last_eval: dict = {}
        self.obs: list | None = None  # each sub-env's current observation
        self.step_done = True  # the current step's updates, log and eval are done (False: resume them first)
        self.eval_pending = False  # an evaluation was interrupted by a stop request: redo it on resume
        self.last_saved_step: int | None = None  # step of the newest finite checkpoint on disk
        self.agent.should_stop = self.should_stop  # long loops inside agents poll this (see module docstring)

        if resume:
            self._load()
        elif branch_from is not None:
            self._branch(Path(str(branch_from)))
        # events at the checkpoint's own step were written before it was saved: purge only later ones
        self.logger = Logger(self.run_dir, purge_step=self.step + 1 if resume else None)
        if not resume:
            self.logger.text("config", "```yaml\n" + OmegaConf.to_yaml(cfg) + "\n```")

    def close(self) -> None:
        """Give back what a trainer holds when it will not train (again): the SIGINT/SIGTERM handlers
        installed at construction (train() restores them itself), the logger and both envs. Safe to
        call twice and after train()."""
        if self._old_handlers is not None:
            self._restore_signal_handlers(self._old_handlers)
            self._old_handlers = None
        self.logger.close()
        self.envs.close()
        self.eval_env.close()

    # ------------------------------------------------------------------ loop
    def should_stop(self) -> bool:
        """True once SIGINT/SIGTERM arrived: long loops (evaluation, an agent's model retrain) end early."""
        return self.stop_requested

    def train(self) -> dict | None:
        """Run until trainer.total_steps; returns the final eval metrics (None when interrupted).
        Raises DivergenceError on NaN/inf, leaving the last finite checkpoint in place."""
        if self.obs is None:
            self.obs = [None] * self.num_envs
            self._reset_episodes(range(self.num_envs))
        old_handlers = self._old_handlers if self._old_handlers is not None else self._install_signal_handlers()
        self._old_handlers = None  # restored when this train() ends; a second train() installs its own
        self._session_start = time.time()
        bar = tqdm(total=self.t.total_steps, initial=self.step, disable=not self.t.progress, dynamic_ncols=True,
                   mininterval=1.0, unit="step")
        try:
            with logging_redirect_tqdm():
                self._loop(bar)
                if not self.stop_requested and self.last_eval.get("step") != self.step:
                    self.evaluate()
                self._checkpoint()
                if self.stop_requested:
                    log.info("interrupted at step %d; checkpoint saved. Continue with: %s",
                             self.step, resume_command(self.run_dir))
                    return None
                return self._write_results()
        except DivergenceError as e:
            log.error("%s", e)
            raise
        finally:
            bar.close()
            self._restore_signal_handlers(old_handlers)
            self.logger.close()
            self.envs.close()  # async sub-envs: their worker processes

    def _loop(self, bar) -> None:
        """Env step, its updates, then log / eval / checkpoint when due. A stop request is honoured
        between any two of these; `step_done`, `update_credit` and `eval_pending` (all
        checkpointed) say where the resumed run picks up, so it continues exactly."""
        total = self.t.total_steps
        self._window = (time.time(), self.step, self.num_updates)
        sums: dict[str, torch.Tensor | float] = {}
        counts: dict[str, int] = {}
        if self.eval_pending:  # a stop interrupted the evaluation at this step: do it before moving on
            self.evaluate()
        while not self.stop_requested:
            if self.step_done:
                if self.step >= total:
                    break
                before = self.step
                self._env_step()
                bar.update(self.step - before)
                learning = self.step - max(before, self.t.warmup_steps)  # this iteration's steps past warm-up
                if learning > 0:
                    self.update_credit += self.t.updates_per_step * learning
                self.step_done = False
            while self.update_credit >= 1.0 and not self.stop_requested:
                try:
                    metrics = self.agent.update(self.step)
                except ckpt_io.UpdateInterrupted:
                    break  # the agent rolled this update back: the resumed run repeats it
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
                    counts[k] = counts.get(k, 0) + 1
                self.num_updates += 1
                self.update_credit -= 1.0
            if self.stop_requested:
                break
            if due(self.t.log_every, self.step, self.num_envs):
                self._log_window(sums, counts, bar)
                sums, counts = {}, {}
            if due(self.t.eval_every, self.step, self.num_envs) and self.step < total:
                self._check_metrics(sums)  # never evaluate a policy whose losses already went NaN
                self.evaluate()
            self.step_done = True
            if due(self.t.checkpoint_every, self.step, self.num_envs) and self.step < total and not self.stop_requested:
                self._check_metrics(sums)
                self._checkpoint()
        self._check_metrics(sums)

    def _log_window(self, sums: dict, counts: dict, bar) -> None:
        now = time.time()
        start, start_step, start_updates = self._window
        perf = {"perf/env_steps_per_s": (self.step - start_step) / max(now - start, 1e-9),
                "perf/updates_per_s": (self.num_updates - start_updates) / max(now - start, 1e-9),
                "perf/frames": self.step * self.cfg.env.action_repeat}
        values = self.logger.scalars({**{k: sums[k] / counts[k] for k in sums}, **perf}, self.step)
        bad = [k for k in sums if not math.isfinite(values[k])]  # logged first: the NaN shows in the curves
        if bad:
            self._diverged(bad, start_step + 1)
        self._window = (now, self.step, self.num_updates)
        bar.set_postfix(ret=f"{self.last_return:.1f}", sps=f"{perf['perf/env_steps_per_s']:.0f}", refresh=False)

    def _check_metrics(self, sums: dict) -> None:
        """Metrics summed since the last log: a NaN/inf in any update makes its sum non-finite, so
        one check per window (one device sync) covers every update in it."""
        bad = ckpt_io.nonfinite({k: v for k, v in sums.items() if torch.is_tensor(v)})
        bad += [k for k, v in sums.items() if not torch.is_tensor(v) and not math.isfinite(v)]
        if bad:
            self._diverged(bad, self._window[1] + 1)

    def _diverged(self, what: list[str], since_step: int) -> None:
        last = (f"the last finite checkpoint (step {self.last_saved_step}) is kept in {self.ckpt_dir / 'last.pt'}"
                if self.last_saved_step is not None else "no checkpoint had been written yet")
        where = f"step {self.step}" if since_step >= self.step else f"steps {since_step}-{self.step}"
        raise DivergenceError(f"training diverged at step {self.step}: non-finite {', '.join(sorted(what)[:8])}"
                              f"{' ...' if len(what) > 8 else ''} (first seen in {where}); {last}. "
                              f"Hint: {metric_hint(self.cfg)}")

    def _write_results(self) -> dict:
        results = {**{k: v for k, v in self.last_eval.items() if k != "step"}, "step": self.step,
                   "frames": self.step * self.cfg.env.action_repeat, "episodes": self.episode,
                   "updates": self.num_updates, "wall_time_s": round(self.wall_time, 1)}
        (self.run_dir / "results.json").write_text(strict_json(results, indent=2))
        self.logger.hparams(hparams_of(self.cfg), {"hparams/final_return": results["eval/return_mean"]})
        log.info("done: eval return %.1f +- %.1f after %d steps; results in %s", results["eval/return_mean"],
                 results["eval/return_std"], self.step, self.run_dir / "results.json")
        return results

    def _env_step(self) -> None:
        """One step of every sub-env. Sub-env i's transition is agent step `step + i + 1`: its
        episode's end is logged at that step, so each sub-env's returns are logged on their own."""
        if self.step < self.t.warmup_steps:
            actions = [self.agent.act_random(obs) for obs in self.obs]
        elif self.num_envs == 1:
            actions = [self.agent.act(self.obs[0], explore=True)]
        else:
            actions = list(self.agent.act_batch(np.stack(self.obs), explore=True))
        ended = []
        for i, (next_obs, reward, terminated, truncated, info) in enumerate(self.envs.step(actions)):
            run = self.running[i]
            stream = {"env_index": i} if self.num_envs > 1 else {}  # single-env agents take no env_index
            self.agent.observe(self.obs[i], actions[i], float(reward), next_obs, bool(terminated), bool(truncated),
                               **stream)
            run.actions.append(np.asarray(actions[i], dtype=np.float32))
            run.ret += float(reward)
            run.length += 1
            self.step += 1
            self.obs[i] = next_obs
            if terminated or truncated:
                self.last_return = run.ret
                metrics = {"train/episode_return": run.ret, "train/episode_length": run.length}
                if success_of(info) is not None:
                    metrics["train/episode_success"] = float(success_of(info))
                self.logger.scalars(metrics, self.step)
                self.episode += 1
                run.episode += 1
                ended.append(i)
        if ended:
            self._reset_episodes(ended)

    def _reset_episodes(self, indices) -> None:
        """Start the next seeded episode of each sub-env in `indices` (sub-env i's own seed stream)."""
        seeds = {i: episode_seed(self.cfg.seed, self.running[i].episode, env_index=i) for i in indices}
        for i, obs in self.envs.reset(seeds).items():
            self.running[i] = Running(episode=self.running[i].episode)
            self.obs[i] = obs
            self.agent.begin_episode(explore=True)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict | None:
        """Deterministic policy on a separate env, the same seeded episodes every time. RNG states
        are restored afterwards (torch CPU and CUDA, Python, NumPy, the agent's own generator) so
        evaluating never changes the training run. A stop request abandons it (returns None) and
        marks it pending, so the resumed run evaluates at this step first."""
        global_rng, agent_rng = ckpt_io.rng_state(), self.agent.np_rng.bit_generator.state
        returns, lengths, successes, frames = [], [], [], []
        self.eval_pending = True
        self.agent.eval_metrics()  # drop what an interrupted evaluation left
        try:
            for i in range(self.t.eval_episodes):
                record = self.t.log_eval_video and i == 0
                ret, length, success = run_episode(self.agent, self.eval_env,
                                                   episode_seed(self.cfg.seed, i, EVAL_STREAM),
                                                   frames if record else None, should_stop=self.should_stop)
                if self.stop_requested:
                    log.info("evaluation at step %d interrupted; the resumed run redoes it", self.step)
                    return None
                returns.append(ret)
                lengths.append(length)
                successes.append(success)
        finally:
            ckpt_io.set_rng_state(global_rng)
            self.agent.np_rng.bit_generator.state = agent_rng
        self.eval_pending = False
        metrics = {"eval/return_mean": float(np.mean(returns)) if returns else float("nan"),
                   "eval/return_std": float(np.std(returns)) if returns else float("nan"),
                   "eval/episode_length": float(np.mean(lengths)) if lengths else float("nan")}
        if successes and None not in successes:  # goal-conditioned envs: share of episodes ending at the goal
            metrics["eval/success_rate"] = float(np.mean(successes))
        metrics.update(self.agent.eval_metrics())
        self.logger.scalars(metrics, self.step)
        for name, img in self.agent.images().items():
            self.logger.image(name, img, self.step)
        if frames:
            self.logger.video("eval/video", frames, self.step)
        self.logger.flush()
        log.info("step %d: eval return %.1f +- %.1f over %d episodes%s", self.step, metrics["eval/return_mean"],
                 metrics["eval/return_std"], len(returns),
                 f", success rate {metrics['eval/success_rate']:.2f}" if "eval/success_rate" in metrics else "")
        self.last_eval = {**metrics, "returns": returns, "step": self.step}
        if returns and not math.isfinite(metrics["eval/return_mean"]):
            self._diverged(["eval/return_mean"], self.step)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _checkpoint(self) -> None:
        self.save(time.time() - self._session_start)
        self._session_start = time.time()

    def save(self, session_seconds: float = 0.0) -> None:
        """last.pt (the previous one kept as prev.pt) and buffers.pt. Refuses a state with NaN/inf in
        any parameter or optimizer state (DivergenceError): a diverged run keeps its last good one."""
        agent_state = self.agent.checkpoint_state()
        bad = ckpt_io.nonfinite(agent_state)
        if bad:
            self._diverged([f"parameter {name}" for name in bad], self.step)
        self.wall_time += session_seconds
        if self.t.save_buffer:  # buffers first: last.pt names the step the buffers must match
            ckpt_io.atomic_save({"step": self.step,
                                 "buffers": {k: b.state_dict() for k, b in self.agent.buffers().items()}},
                                self.ckpt_dir / "buffers.pt")
        cfg_plain = to_plain(self.cfg)
        state = {
            "format_version": ckpt_io.FORMAT_VERSION,
            "fingerprint": ckpt_io.fingerprint(cfg_plain),
            "config": cfg_plain,
            "counters": {"step": self.step, "episode": self.episode, "num_updates": self.num_updates,
                         "update_credit": self.update_credit, "wall_time": self.wall_time,
                         "last_return": self.last_return, "step_done": self.step_done,
                         "eval_pending": self.eval_pending},
            "sub_envs": [{"episode": run.episode, "return": run.ret, "length": run.length,
                          "actions": torch.as_tensor(np.array(run.actions, dtype=np.float32).reshape(
                              len(run.actions), self.agent.action_dim)),
                          "obs": map_obs(lambda o: torch.as_tensor(np.asarray(o)), obs)}
                         for run, obs in zip(self.running, self.obs)],
            "last_eval": {k: v for k, v in self.last_eval.items()},
            "rng": ckpt_io.rng_state(),
            "agent": agent_state,
            "buffers_saved": bool(self.t.save_buffer),
        }
        ckpt_io.atomic_save(state, self.ckpt_dir / "last.pt", keep_previous=self.ckpt_dir / "prev.pt")
        self.last_saved_step = self.step
        self.logger.flush()
        log.info("checkpoint saved at step %d: %s", self.step, self.ckpt_dir / "last.pt")

    def _branch(self, source: Path) -> None:
        """branch_from: start this new run from `source`'s last checkpoint, everything as a resume of
        it would (so an unchanged config continues exactly as the source does), except the config,
        which is this run's: the optimizers keep their moments but take this config's learning rates
        and other hyper-parameters. train.check_branch has checked the source, seed and env first."""
        fresh = {name: [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                 for name, opt in self.agent.optimizers.items()}
        self._load(source / "checkpoints")
        for name, groups in fresh.items():
            for group, hyper in zip(self.agent.optimizers[name].param_groups, groups):
                group.update(hyper)
        if self.step >= self.t.total_steps:
            raise ConfigError(f"branch_from={source} is at step {self.step}: set trainer.total_steps above it")
        self.last_saved_step = None  # nothing saved in this run's own directory yet
        log.info("branched from %s at step %d", source, self.step)

    def _load(self, ckpt_dir: Path | None = None) -> None:
        """Restore a checkpoint (this run's own unless `ckpt_dir` is given: a branch's source)."""
        ckpt_dir = self.ckpt_dir if ckpt_dir is None else ckpt_dir
        path = ckpt_dir / "last.pt"
        try:
            state = ckpt_io.load(path)
            fallback = False
        except ckpt_io.CheckpointError as e:
            prev = ckpt_dir / "prev.pt"
            if not prev.exists():
                raise
            log.warning("%s; resuming from the previous checkpoint %s instead", e, prev)
            path, state, fallback = prev, ckpt_io.load(prev), True
        ckpt_io.check_compatible(state, to_plain(self.cfg), path)
        try:
            self.agent.load_checkpoint_state(state["agent"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ckpt_io.CheckpointError(f"checkpoint {path} does not match the agent built from this config "
                                          f"({type(e).__name__}: {str(e).splitlines()[0]}). Resume with the run's "
                                          "own config.yaml, without overrides that change network shapes.") from None
        c = state["counters"]
        self.step, self.episode, self.num_updates = c["step"], c["episode"], c["num_updates"]
        self.update_credit, self.wall_time = c["update_credit"], c["wall_time"]
        self.last_return = c["last_return"]
        self.step_done, self.eval_pending = c.get("step_done", True), c.get("eval_pending", False)
        self.last_saved_step = self.step
        self.last_eval = state["last_eval"]
        buffers_file = ckpt_dir / "buffers.pt"
        if state["buffers_saved"] and buffers_file.exists():
            bufs = ckpt_io.load(buffers_file)
            if bufs["step"] != self.step and fallback:
                log.warning("%s is from step %d, prev.pt from step %d: the replay buffer restarts empty and the "
                            "resumed run will not match an uninterrupted one exactly", buffers_file, bufs["step"],
                            self.step)
            elif bufs["step"] != self.step:
                raise ckpt_io.CheckpointError(f"{buffers_file} is from step {bufs['step']} but last.pt from step "
                                              f"{self.step}: the run was killed while checkpointing; no exact resume")
            for name, buf in self.agent.buffers().items():
                if bufs["step"] == self.step:
                    buf.load_state_dict(bufs["buffers"][name])
        else:
            log.warning("no replay buffer in the checkpoint (trainer.save_buffer=false): the resumed run refills it "
                        "and will not match an uninterrupted run exactly")
        # rebuild every sub-env's running episode: same seeded reset, same actions
        subs = state.get("sub_envs") or [{  # a checkpoint from before vector envs: one env
            "episode": c["episode"], "return": c["episode_return"], "length": c["episode_length"],
            "actions": state["episode_actions"], "obs": state["obs"]}]
        self.obs = self.envs.replay([(episode_seed(self.cfg.seed, sub["episode"], env_index=i), sub["actions"].numpy())
                                     for i, sub in enumerate(subs)])
        for i, (sub, obs) in enumerate(zip(subs, self.obs)):
            saved = sub["obs"] if isinstance(sub["obs"], dict) else {None: sub["obs"]}
            replayed = obs if isinstance(obs, dict) else {None: obs}
            if saved.keys() != replayed.keys() or not all(np.array_equal(np.asarray(replayed[k]), saved[k].numpy())
                                                           for k in saved):
                log.warning("replaying the running episode%s did not reproduce its observation (non-deterministic "
                            "env); continuing from the replayed state", f" of sub-env {i}" if len(subs) > 1 else "")
        self.running = [Running(sub["episode"], list(sub["actions"].numpy()), sub["return"], sub["length"])
                        for sub in subs]
        ckpt_io.set_rng_state(state["rng"])
        log.info("restored %s at step %d (episode %d, %d updates)", ckpt_dir.parent, self.step, self.episode,
                 self.num_updates)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        owner, old = os.getpid(), {}

        def request_stop(signum, frame):
            if os.getpid() != owner:  # a process forked while building (an async env's worker) inherited this
                return _as_before(signum, frame, old.get(signum, signal.SIG_DFL))  # handler: act as it would have
            name = signal.Signals(signum).name
            if self.stop_requested and time.time() - self._stop_time < 1.0:
                return  # the same stop twice (Ctrl-C reaches a sweep worker directly and through its parent)
            if self.stop_requested:  # a second signal: the user does not want to wait for the checkpoint
                log.warning("received %s again: exiting now without a checkpoint", name)
                raise KeyboardInterrupt
            log.warning("received %s: stopping at the next safe point, saving a checkpoint, then exiting "
                        "(send it again to exit at once without saving)", name)
            self.stop_requested, self._stop_time = True, time.time()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (some launchers): no handler, no crash
                pass
        return old

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)
