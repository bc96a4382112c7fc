"""env=dmc: the DeepMind Control Suite, the benchmark latent and pixel RL papers report on (PlaNet,
CURL, DrQ, Dreamer, TD-MPC2), so that our results can be set beside theirs.

A thin adapter over `dm_control.suite` rather than shimmy's: float32 flattened state observations,
float32 actions in [-1, 1] rescaled to the task's bounds, and one render per agent step from pixels.
Everything else is the pipeline CarRacing uses (envs/wrappers.py), in the same order:
action repeat -> render -> preprocess (HWC -> CHW) -> frame stack, so stacked frames are
`action_repeat` env steps apart and only the frame the agent sees is rendered.

Defaults follow the papers: 84x84 frames from camera 0 (2 for quadruped), 3 stacked frames, and
from pixels the per-task action repeat of PlaNet/CURL/DrQ. dm_control is imported lazily: this
module is read by config validation, which must not pay for (or require) MuJoCo."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
from omegaconf import DictConfig, OmegaConf

from latentrl.config import ConfigError
from latentrl.envs.wrappers import ActionRepeat, FrameStack, PixelPreprocess

log = logging.getLogger("latentrl")


class _DropSuiteXmlWarning(logging.Filter):
    """MuJoCo >= 3.17 warns that the suite's own XML uses a deprecated attribute (settotalmass) on
    every task load: nothing a user can act on, and it would open every dmc run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "'settotalmass' is deprecated" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropSuiteXmlWarning())

PIXEL_SIZE = 84  # frame side of PlaNet/CURL/DrQ; env.resize renders at another size directly
PIXEL_FRAME_STACK = 3  # CURL/DrQ stack 3 frames
# action repeat from pixels per domain (PlaNet's choice, kept by CURL and DrQ); other domains 4
PIXEL_ACTION_REPEAT = {"cartpole": 8, "finger": 2, "walker": 2}
DEFAULT_PIXEL_ACTION_REPEAT = 4
CAMERA = {"quadruped": 2}  # the papers' camera ('y'; quadruped's 0 is a fixed, distant view); 0 elsewhere
RENDER_PACKAGES = "libegl1 (EGL) or libosmesa6 (OSMesa), e.g. `apt-get install libosmesa6`"


# ---------------------------------------------------------------------------- config defaults
def split_task(task: str) -> tuple[str, str]:
    """'ball_in_cup-catch' -> ('ball_in_cup', 'catch'): domains hold underscores, never hyphens,
    so the task name starts after the last hyphen."""
    domain, _, name = str(task).rpartition("-")
    return domain, name


def env_defaults(env_cfg) -> dict:
    """Values for env.action_repeat and env.frame_stack left null. From pixels: the papers'
    per-task repeat and 3 stacked frames; from states: 1 and 1, as state-based SAC baselines run.
    Other envs: 1 and 1. config.validate writes them into the config, so frames (steps x repeat),
    the saved config.yaml and checkpoints see the numbers used."""
    if env_cfg.id != "dmc" or not env_cfg.pixels:
        return {"action_repeat": 1, "frame_stack": 1}
    domain = split_task(env_cfg.task)[0]
    return {"action_repeat": PIXEL_ACTION_REPEAT.get(domain, DEFAULT_PIXEL_ACTION_REPEAT),
            "frame_stack": PIXEL_FRAME_STACK}


def _setting(env_cfg, key: str) -> int:
    value = env_cfg.get(key)
    return int(env_defaults(env_cfg)[key] if value is None else value)


# ---------------------------------------------------------------------------- rendering
_PROBE = """
from dm_control import mujoco
xml = '<mujoco><worldbody><light pos="0 0 1"/><geom type="sphere" size=".1"/></worldbody></mujoco>'
mujoco.Physics.from_xml_string(xml).render(8, 8)
"""
_renderer_errors: dict[str, str] | None = None  # backend -> why it failed, once per process


def _probe(backend: str) -> str | None:
    """Render one tiny frame with `backend` in a child process; None if it worked, else the reason.
    A child, because dm_control fixes its OpenGL backend at import and cannot switch afterwards."""
    env = {**os.environ, "MUJOCO_GL": backend}
    if backend in ("egl", "osmesa"):
        env["PYOPENGL_PLATFORM"] = backend
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "timed out"
    if proc.returncode == 0:
        return None
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def select_renderer(probe=_probe) -> dict[str, str]:
    """Before dm_control is first imported: keep MUJOCO_GL (egl unless the user chose) if it
    renders, else fall back to osmesa, else disable rendering so state-based tasks still run.
    Returns the failures (backend -> reason); empty when a renderer works."""
    global _renderer_errors
    if _renderer_errors is not None or "dm_control._render" in sys.modules:
        return _renderer_errors or {}
    wanted = os.environ.get("MUJOCO_GL", "egl")
    errors = {}
    for backend in [wanted] + (["osmesa"] if wanted == "egl" else []):
        reason = probe(backend)
        if reason is None:
            os.environ["MUJOCO_GL"] = backend
            break
        errors[backend] = reason
    else:
        os.environ["MUJOCO_GL"] = "disable"
    if errors:
        log.warning("MuJoCo rendering failed with %s; using MUJOCO_GL=%s",
                    "; ".join(f"MUJOCO_GL={b} ({why})" for b, why in errors.items()), os.environ["MUJOCO_GL"])
    _renderer_errors = errors
    return errors


def renderer_error(errors: dict[str, str], cause: str = "") -> ConfigError:
    """The one line a user gets when frames cannot be drawn: what failed and what to install."""
    tried = "; ".join(f"MUJOCO_GL={b}: {why}" for b, why in errors.items()) or cause
    return ConfigError(f"env=dmc with env.pixels=true (or an eval video) needs a headless OpenGL renderer for MuJoCo "
                       f"and none works here ({tried}). Install the system package {RENDER_PACKAGES}, "
                       "or set env.pixels=false")


# ---------------------------------------------------------------------------- the env
class DMCEnv(gym.Env):
    """One dm_control.suite task as a gymnasium env, from states. render() draws the frame pixel
    observations are made of (`size` x `size` from the paper's camera)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str, render_mode: str | None = None, size: int = PIXEL_SIZE,
                 camera_id: int | None = None, task_kwargs: dict | None = None,
                 environment_kwargs: dict | None = None):
        select_renderer()  # before dm_control's first import, which fixes the OpenGL backend
        from dm_control import suite

        domain, name = split_task(task)
        if (domain, name) not in suite.ALL_TASKS:
            valid = ", ".join(f"{d}-{t}" for d, t in suite.ALL_TASKS)
            raise ConfigError(f"env.task={task!r} is not a DeepMind Control Suite task: set env.task=<domain>-<task>, "
                              f"one of {valid}")
        # the task's random state draws every initial state; reset(seed=...) reseeds it
        self._env = suite.load(domain, name, task_kwargs={"random": 0, **(task_kwargs or {})},
                               environment_kwargs=environment_kwargs)
        self.render_mode, self.size = render_mode, int(size)
        self.camera_id = CAMERA.get(domain, 0) if camera_id is None else int(camera_id)
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self._env.control_timestep())}

        spec = self._env.action_spec()
        self._low, self._high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, spec.shape, np.float32)
        dim = sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        if render_mode is not None:
            self._check_render()

    def _check_render(self) -> None:
        """Fail at start-up in one line, not at the first pixel step deep inside training."""
        try:
            self.render()
        except Exception as e:  # noqa: BLE001 - any backend failure means the same fix
            raise renderer_error(_renderer_errors or {}, f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    @staticmethod
    def _flatten(observation) -> np.ndarray:
        return np.concatenate([np.asarray(v, np.float64).ravel() for v in observation.values()]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:  # a seed of any size -> the task's RandomState (which takes 32-bit words)
            self._env.task.random.seed(np.random.SeedSequence(seed).generate_state(4))
        return self._flatten(self._env.reset().observation), {}

    def step(self, action):
        action = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        ts = self._env.step(self._low + (action + 1.0) * 0.5 * (self._high - self._low))
        # dm_env ends every episode with a LAST step: discount 0 is a true termination, discount 1
        # the suite's time limit (1000 env steps), which must not stop bootstrapping
        terminated = bool(ts.last() and ts.discount == 0.0)
        truncated = bool(ts.last() and not terminated)
        return self._flatten(ts.observation), float(ts.reward or 0.0), terminated, truncated, {}

    def render(self) -> np.ndarray:
        return self._env.physics.render(height=self.size, width=self.size, camera_id=self.camera_id)

    def close(self) -> None:
        self._env.close()


def make_dmc(env_cfg: DictConfig, render_mode: str | None = None) -> gym.Env:
    """env=dmc through the shared wrappers: repeat -> render -> preprocess -> stack (see module doc)."""
    if not env_cfg.get("task"):
        raise ConfigError("env=dmc needs env.task=<domain>-<task>, e.g. env.task=cheetah-run")
    pixels, repeat, stack = bool(env_cfg.pixels), _setting(env_cfg, "action_repeat"), _setting(env_cfg, "frame_stack")
    if not pixels and (stack > 1 or env_cfg.resize or env_cfg.grayscale):
        raise ConfigError("env.frame_stack/resize/grayscale apply to pixel envs only: set env.pixels=true or drop them")
    if importlib.util.find_spec("dm_control") is None:
        raise ConfigError("env=dmc needs dm_control: pip install -e '.[dmc]'")
    kwargs = OmegaConf.to_container(env_cfg.kwargs, resolve=True) if env_cfg.get("kwargs") else {}
    try:
        env = DMCEnv(env_cfg.task, render_mode="rgb_array" if pixels or render_mode else None,
                     size=env_cfg.resize or PIXEL_SIZE, **kwargs)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise ConfigError(f"env.kwargs {sorted(kwargs)} do not fit env=dmc ({e}); it takes camera_id, task_kwargs "
                          "and environment_kwargs") from None
    if env_cfg.get("max_episode_steps"):  # only shortens: the suite's own limit still ends episodes
        env = gym.wrappers.TimeLimit(env, int(env_cfg.max_episode_steps))
    if repeat > 1:
        env = ActionRepeat(env, repeat)
    if pixels:
        env = gym.wrappers.AddRenderObservation(env, render_only=True)  # frames drawn at the final size
        env = PixelPreprocess(env, None, bool(env_cfg.grayscale))
        if stack > 1:
            env = FrameStack(env, stack)
    return env
