"""Typed schemas for the config groups the trainer reads, validation with readable errors,
and the OmegaConf resolvers the Hydra config uses (run directory naming)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and how to fix it."""


class DivergenceError(RuntimeError):
    """Training produced NaN/inf (losses or parameters). The run stopped without overwriting its
    last finite checkpoint; the message names the step, the metrics and what to try."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or SLURM), which
    can be fewer than os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resume_command(run_dir) -> str:
    """The shell command that continues run_dir, ready to paste: a sweep job's directory is named after
    its overrides ('0_agent.k=5,seed=0'), and Hydra reads '=' or ',' in an unquoted value as syntax, so
    such a path is quoted for Hydra ('...') inside quotes for the shell."""
    value = str(run_dir)
    if re.search(r"[=,\s'\"\[\](){}:]", value):
        value = "'" + value.replace("'", "\\'") + "'"
    arg = f"resume={value}"
    return "python train.py " + (f'"{arg}"' if arg != shlex.quote(arg) and not re.search(r'[$`"\\!]', arg)
                                 else shlex.quote(arg))


def check_machine(cfg: DictConfig) -> None:
    """Refuse, at start-up and naming the key, settings this machine cannot honour; otherwise they
    fail minutes later deep inside torch (an assertion in an agent's constructor)."""
    import torch

    device = str(cfg.get("device", "auto"))
    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"'device' must be auto, cpu, cuda or cuda:N, got {device!r}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"device={device}: CUDA is not available on this machine (torch {torch.__version__}, "
                                  f"CUDA build: {torch.version.cuda or 'none'}); use device=cpu or device=auto")
            count = torch.cuda.device_count()
            if dev.index is not None and dev.index >= count:
                raise ConfigError(f"device={device}: this machine has {count} CUDA device(s), "
                                  f"cuda:0 to cuda:{count - 1}; set device=cuda:<index below {count}>")
        elif dev.type == "mps":
            if not torch.backends.mps.is_available():
                raise ConfigError(f"device={device}: MPS is not available on this machine; "
                                  "use device=cpu or device=auto")
        elif dev.type != "cpu":
            raise ConfigError(f"'device' must be auto, cpu, cuda or cuda:N, got {device!r}")
    threads = cfg.get("threads")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"'threads' must be null or a positive integer, got {threads!r}")
        cores = usable_cores()
        if threads > cores:
            raise ConfigError(f"threads={threads}: this process may use {cores} CPU core(s); set threads<={cores} "
                              "(more threads than cores only makes them wait for each other)")


def check_output_dir(run_dir, key: str) -> None:
    """Create the run directory and prove it writable now, not at the first checkpoint."""
    from pathlib import Path

    run_dir = Path(run_dir)
    probe = run_dir / f".write_test.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}={run_dir}: the run directory cannot be written ({e.strerror or e}); "
                          f"set {key} to a writable directory") from None


@dataclass
class EnvConfig:
    id: str = "Pendulum-v1"  # gymnasium id, or dmc (the DeepMind Control Suite, envs/dmc.py)
    task: Optional[str] = None  # env.id=dmc: the suite's domain-task, e.g. cheetah-run
    pixels: bool = False  # observations are images (uint8, stored channels-first)
    action_repeat: Optional[int] = 1  # repeat each agent action this many env frames (null: the env's default)
    frame_stack: Optional[int] = 1  # stack this many frames along channels, pixels only (null: the env's default)
    resize: Optional[int] = None  # square side to resize frames to (pixels only; null keeps native)
    grayscale: bool = False  # convert RGB frames to one channel (pixels only)
    max_episode_steps: Optional[int] = None  # override the env's time limit, in env frames
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments for gymnasium.make
    buffer_size: int = 1_000_000  # default replay capacity for this env (agent configs read ${env.buffer_size})
    map: Optional[str] = None  # maze layout of env.id=PointMaze|AntMaze: umaze | medium | large (envs/maze.py)
    reward: Optional[str] = None  # maze reward: sparse | dense
    num_envs: int = 1  # training envs stepped together (gymnasium vector API); 1: a single env, no vector API
    vector_mode: str = "auto"  # num_envs > 1: auto (async for pixels, sync for states) | sync | async
    lazy_render: bool = True  # CarRacing with action_repeat > 1: draw only the frames the agent sees (same observations, ~3x faster)


@dataclass
class TrainerConfig:
    total_steps: int = 100_000  # agent steps (env frames = steps * action_repeat)
    warmup_steps: int = 5_000  # uniformly random actions before learning starts
    updates_per_step: float = 1.0  # agent.update() calls per env step; fractions update every few steps
    eval_every: int = 10_000  # evaluate every this many steps (0: only at the end)
    eval_episodes: int = 10  # deterministic episodes per evaluation
    checkpoint_every: int = 10_000  # write checkpoints/last.pt every this many steps (0: only at the end)
    save_buffer: bool = True  # also checkpoint the replay buffers (needed for an exact resume)
    log_every: int = 1_000  # average and log training metrics every this many steps
    progress: bool = True  # console progress bar
    log_eval_video: bool = False  # log one eval episode as an animated image to TensorBoard


VECTOR_MODES = ("auto", "sync", "async")  # env.vector_mode
_SCHEMAS = {"env": EnvConfig, "trainer": TrainerConfig}
_NON_NEGATIVE = {
    "trainer": ["total_steps", "warmup_steps", "updates_per_step", "eval_every", "eval_episodes",
                "checkpoint_every"],
}
_POSITIVE = {"trainer": ["log_every"], "env": ["action_repeat", "frame_stack", "buffer_size", "num_envs"]}


def validate(cfg: DictConfig) -> None:
    """Check the typed groups in place: unknown keys, wrong types and out-of-range values
    raise ConfigError naming the key, instead of failing deep inside a run."""
    for group, schema in _SCHEMAS.items():
        if group not in cfg:
            raise ConfigError(f"config has no '{group}' group: add '- {group}: ...' to the defaults list")
        try:
            typed = OmegaConf.merge(OmegaConf.structured(schema), cfg[group])
        except OmegaConfBaseException as e:
            key = f"{group}.{e.key}" if getattr(e, "key", None) else group
            raise ConfigError(
                f"invalid config value at '{key}': {e.msg if hasattr(e, 'msg') else e}. "
                f"Fix the override or YAML (expected fields: {', '.join(schema.__dataclass_fields__)})"
            ) from None
        if group == "env":
            from latentrl.envs.dmc import env_defaults  # lazy: latentrl.envs imports this module

            for name, value in env_defaults(typed).items():
                if typed[name] is None:  # resolved here, so frames = steps x action_repeat everywhere
                    typed[name] = value
        for name in _NON_NEGATIVE.get(group, []):
            if typed[name] < 0:
                raise ConfigError(f"'{group}.{name}' must be >= 0, got {typed[name]}: set {group}.{name}=<non-negative number>")
        for name in _POSITIVE.get(group, []):
            if typed[name] < 1:
                raise ConfigError(f"'{group}.{name}' must be >= 1, got {typed[name]}: set {group}.{name}=<positive integer>")
        with _open(cfg):
            cfg[group] = typed
    if cfg.env.vector_mode not in VECTOR_MODES:
        raise ConfigError(f"'env.vector_mode' must be one of {', '.join(VECTOR_MODES)}, got {cfg.env.vector_mode!r}: "
                          "set env.vector_mode=auto (async for pixel envs, sync for states)")
    if cfg.env.resize is not None and cfg.env.resize < 8:
        raise ConfigError(f"'env.resize' must be null or >= 8, got {cfg.env.resize}")
    if not isinstance(cfg.get("seed"), int) or cfg.seed < 0:
        raise ConfigError(f"'seed' must be a non-negative integer, got {cfg.get('seed')!r}")


class _open:
    """Temporarily lift struct/readonly flags so validated groups can replace the raw ones."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self):
        self.struct, self.ro = OmegaConf.is_struct(self.cfg), OmegaConf.is_readonly(self.cfg)
        OmegaConf.set_struct(self.cfg, False)
        OmegaConf.set_readonly(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, self.struct)
        OmegaConf.set_readonly(self.cfg, self.ro)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain-dict copy (checkpoints store configs this way: weights_only loads refuse DictConfig)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _run_dir(resume: Any, date: str, time: str, agent: str, env: str, seed: Any) -> str:
    """A resumed run continues in its own directory; a new one gets a name unique even when two
    runs start in the same second (a short random suffix)."""
    if resume not in (None, "None", "null", ""):
        return os.path.abspath(str(resume))
    return f"outputs/{date}/{time}_{agent}_{env}_s{seed}_{secrets.token_hex(2)}"


def _output_subdir(resume: Any, time: str) -> str:
    """Keep a run's original .hydra/ intact when it is resumed."""
    if resume not in (None, "None", "null", ""):
        return f".hydra_resume/{time}"
    return ".hydra"


SWEEP_SUBDIR_MAX = 200  # bytes of a sweep job's directory name kept readable (most filesystems allow 255)


def _sweep_subdir(num: Any, override_dirname: Any) -> str:
    """A sweep job's directory, `<num>_<overrides>`; a long override list (many keys) is cut and
    ended with a hash of the whole list, so the name stays unique and under the filesystem's limit
    (255 bytes) instead of failing the sweep with "File name too long". A '/' in a value (a path:
    branch_from=outputs/...) would nest directories, so it becomes '%'."""
    name = f"{num}_{override_dirname}".replace("/", "%")
    if len(name.encode()) <= SWEEP_SUBDIR_MAX:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    head = name.encode()[:SWEEP_SUBDIR_MAX - len(digest) - 1].decode(errors="ignore")
    return f"{head}_{digest}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("latentrl_sweep_subdir", _sweep_subdir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("latentrl_run_dir", _run_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("latentrl_output_subdir", _output_subdir, use_cache=True, replace=True)
