"""Learning tests (slow): an agent must do clearly better than random actions."""

import json

import pytest

from conftest import train_run


@pytest.mark.slow
def test_sac_learns_pendulum(tmp_path):
    """Random actions score about -1200 on Pendulum-v1; SAC reaches >= -400 within 6k env steps (it first
    does at ~2.5k: see test_latent_mbrl_learns_pendulum_faster_than_sac)."""
    final = train_run(["env=pendulum", "agent=sac", "trainer.total_steps=6000", "trainer.warmup_steps=1000",
                       "trainer.eval_every=2000", "trainer.eval_episodes=10", "trainer.checkpoint_every=0",
                       "trainer.progress=false"], tmp_path)
    evals = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curve = [(e["step"], round(e["eval/return_mean"])) for e in evals if "eval/return_mean" in e]
    assert final >= -400, f"SAC eval return {final:.0f} at 6k steps; curve {curve}"
