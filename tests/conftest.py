"""Shared test helpers: compose configs the way train.py does (hydra.compose, no chdir), and run
short trainings in a temp directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import latentrl  # noqa: F401  (registers resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("MUJOCO_GL", "egl")
# one torch thread: the small networks of these tests gain little from two, and two threads per process
# slow down badly whenever a test's subprocesses (sweeps, SIGTERM runs) compete for the same cores
torch.set_num_threads(1)

# a budget that exercises every part of the loop in seconds
TINY = ["trainer.total_steps=300", "trainer.warmup_steps=100", "trainer.eval_every=0", "trainer.eval_episodes=1",
        "trainer.checkpoint_every=0", "trainer.log_every=50", "trainer.progress=false"]


def compose_cfg(overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()


def train_run(overrides: list[str], run_dir: Path):
    """Compose + train in-process (what train.py does, minus Hydra's run-dir handling)."""
    from latentrl.train import run

    cfg = compose_cfg(overrides)
    return run(cfg, run_dir=run_dir, overrides=overrides)


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """Every test starts from the same global torch and numpy RNG state, so a test that draws its data
    with torch.randn or np.random passes or fails the same way on every run and under xdist."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def compose_config():
    return compose_cfg


@pytest.fixture
def tiny():
    return list(TINY)
