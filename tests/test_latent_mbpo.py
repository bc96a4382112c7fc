"""latent_mbpo: model pieces, rollouts, the real/model mix, smoke runs on three envs, exact resume,
and (slow) sample efficiency against SAC on Pendulum."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import TINY, compose_cfg, train_run
from latentrl.config import ConfigError
from latentrl.envs import make_env

# a small, fast model: every part of the cycle runs within a TINY budget (retrain every 50 steps)
SMALL = ["agent=latent_mbpo", "agent.model_hidden_dims=[32,32]", "agent.hidden_dims=[32,32]", "agent.latent_dim=8",
         "agent.model_train_every=50", "agent.model_train_steps=10", "agent.model_init_train_steps=20",
         "agent.rollouts_per_step=16", "agent.updates_per_step=2", "agent.batch_size=32",
         "agent.model_batch_size=32", "agent.holdout_size=100", "agent.buffer_size=2000"]


def make_agent(overrides=(), env="pendulum", fill=300):
    cfg = compose_cfg([f"env={env}", *SMALL, *overrides])
    e = make_env(cfg.env)
    encoder = instantiate(cfg.encoder, obs_space=e.observation_space)
    agent = instantiate(cfg.agent, encoder=encoder, obs_space=e.observation_space, action_space=e.action_space,
                        device="cpu", seed=0, _recursive_=False)
    obs, _ = e.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(fill):
        a = rng.uniform(-1, 1, e.action_space.shape).astype(np.float32)
        nxt, r, term, trunc, _ = e.step(a)
        agent.observe(obs, a, float(r), nxt, term, trunc)
        obs = e.reset()[0] if term or trunc else nxt
    return agent


# ------------------------------------------------------------------------------------------ units
def test_ensemble_shapes_and_members_differ():
    agent = make_agent(["agent.ensemble_size=4", "agent.num_elites=2"])
    z, a = torch.randn(10, 8), torch.rand(10, 1) * 2 - 1
    mean, logvar = agent.ensemble(z, a)
    assert mean.shape == logvar.shape == (4, 10, 8 + 1)  # dz and reward per member
    assert not torch.allclose(mean[0], mean[1])
    assert (logvar <= agent.ensemble.max_logvar + 1e-5).all() and (logvar >= agent.ensemble.min_logvar - 1e-5).all()


def test_elites_have_the_lowest_holdout_loss():
    agent = make_agent(["agent.ensemble_size=5", "agent.num_elites=2"])
    metrics = agent.train_model()
    holdout = torch.tensor([float(metrics[f"model/holdout_loss_m{m}"]) for m in range(5)])
    assert agent.elites.tolist() == sorted(torch.argsort(holdout)[:2].tolist())
    elites = agent.elites.tolist()
    assert [metrics[f"model/elite_mask_m{m}"] for m in range(5)] == [float(m in elites) for m in range(5)]
    for key in ("model/latent_err_1step", "model/latent_err_5step", "model/reward_mse", "loss/decoder", "loss/kl",
                "loss/transition", "loss/encoder"):
        assert torch.isfinite(torch.as_tensor(metrics[key])), key


@pytest.mark.parametrize("term_bias,expected_steps", [(20.0, 1), (-20.0, 4)])
def test_predicted_termination_stops_rollouts(term_bias, expected_steps):
    agent = make_agent(["agent.termination=learned", "agent.rollout_schedule=[0,1,4,4]"])
    agent.train_model()
    with torch.no_grad():
        agent.term_model[-1].weight.zero_()
        agent.term_model[-1].bias.fill_(term_bias)
    before = len(agent.model_buffer)
    agent.rollout(16)
    assert len(agent.model_buffer) - before == 16 * expected_steps
    assert agent.model_buffer.terminated[before: before + 16].all() == (term_bias > 0)


def test_rollouts_start_from_real_latents_with_the_current_policy():
    agent = make_agent(["agent.termination=never"])
    agent.train_model()
    with torch.no_grad():  # a policy whose action is ~tanh(0.3) everywhere
        last = agent.sac.actor.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.3, -5.0]))
    agent.rollout(16)
    buf = agent.model_buffer
    assert np.allclose(buf.action[:16], np.tanh(0.3), atol=0.05)
    real = agent.encode_mean(agent.replay.obs[: agent.replay.size]).numpy()
    dists = ((buf.z[:16, None, :] - real[None]) ** 2).sum(-1).min(1)
    assert np.allclose(dists, 0.0, atol=1e-10), "rollout starts must be encoder means of real observations"
    with torch.no_grad():  # change the policy: the next rollouts follow it
        last.bias.copy_(torch.tensor([-0.5, -5.0]))
    agent.rollout(16)
    assert np.allclose(buf.action[16:32], np.tanh(-0.5), atol=0.05)


def test_real_model_mix_ratio():
    agent = make_agent(["agent.real_ratio=0.25", "agent.batch_size=32"])
    agent.train_model()
    agent.rollout(64)
    agent.model_buffer.reward[: len(agent.model_buffer)] = 999.0  # mark model transitions
    batches = agent.sample_batches(3)
    assert batches["z"].shape == (3, 32, 8)
    is_model = batches["reward"] == 999.0
    assert (is_model.sum(1) == 32 - 8).all()  # round(32 * 0.25) = 8 real per batch
    assert not is_model[:, :8].any()


def test_bad_config_values_name_the_key():
    # instantiate wraps the agent's ConfigError; the trainer hands it to the user as is
    with pytest.raises((ConfigError, InstantiationException), match="num_elites"):
        make_agent(["agent.num_elites=9"], fill=0)
    with pytest.raises((ConfigError, InstantiationException), match="rollout_schedule"):
        make_agent(["agent.rollout_schedule=[0,10,5,1]"], fill=0)
    with pytest.raises((ConfigError, InstantiationException), match="termination"):
        make_agent(["agent.termination=sometimes"], fill=0)


# ------------------------------------------------------------------------------------------ runs
@pytest.mark.parametrize("overrides", [
    ["env=pendulum"],
    ["env=hopper", "agent.termination=learned", "agent.rollout_schedule=[0,200,1,3]"],
    # CarRacing renders every frame: short episodes and a shorter run keep it to seconds
    ["env=carracing", "env.resize=32", "env.action_repeat=4", "env.max_episode_steps=200", "agent.rollouts_per_step=4",
     "trainer.total_steps=160", "trainer.warmup_steps=50"],
])
def test_smoke(tmp_path, overrides):
    train_run([*SMALL, *TINY, *overrides], tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert np.isfinite(results["eval/return_mean"])
    assert results["step"] == compose_cfg([*SMALL, *TINY, *overrides]).trainer.total_steps
    logged = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        logged.update(json.loads(line))
    for key in ("model/holdout_loss_m0", "model/elite_mask_m0", "model/rollout_length", "model/buffer_size",
                "model/latent_err_1step", "loss/critic", "loss/actor", "loss/decoder", "loss/kl"):
        assert key in logged and np.isfinite(logged[key]), key


def test_resume_is_exact(tmp_path):
    exact = [*SMALL, "env=pendulum", "trainer.warmup_steps=100", "trainer.eval_every=0", "trainer.eval_episodes=1",
             "trainer.log_every=50", "trainer.checkpoint_every=0", "trainer.progress=false"]
    train_run([*exact, "trainer.total_steps=330"], tmp_path / "straight")
    train_run([*exact, "trainer.total_steps=230"], tmp_path / "split")  # mid-episode, between two retrains
    train_run([f"resume={tmp_path / 'split'}", "trainer.total_steps=330"], tmp_path / "unused")
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["agent"]
            for r in ("straight", "split"))
    assert a["extra"] == b["extra"] and a["extra"]["num_retrains"] >= 3
    for key in a["modules"]:
        assert torch.equal(a["modules"][key], b["modules"][key]), f"{key} differs after resume"
    bufs = [torch.load(tmp_path / r / "checkpoints" / "buffers.pt", weights_only=True)["buffers"]
            for r in ("straight", "split")]
    for name in ("replay", "model"):
        for key, val in bufs[0][name].items():
            if torch.is_tensor(val):
                assert torch.equal(val, bufs[1][name][key]), f"buffer {name}.{key} differs after resume"


# ------------------------------------------------------------------------------------------ learning
def _steps_to_solve(tmp_path, overrides, chunk, limit, threshold=-400.0):
    """Train in chunks of `chunk` env steps (resuming), evaluating at each chunk's end; returns the
    first step whose mean eval return reaches `threshold` (limit + chunk if never)."""
    run_dir = tmp_path / overrides[0].split("=")[1]
    base = [*overrides, "env=pendulum", "trainer.eval_episodes=5", "trainer.eval_every=0",
            "trainer.checkpoint_every=0", "trainer.log_every=500", "trainer.progress=false"]
    for total in range(chunk, limit + 1, chunk):
        args = [*base, f"trainer.total_steps={total}"] if total == chunk else \
            [f"resume={run_dir}", f"trainer.total_steps={total}"]
        ret = train_run(args, run_dir)
        if ret >= threshold:
            return total
    return limit + chunk


@pytest.mark.slow
def test_latent_mbpo_learns_pendulum_faster_than_sac(tmp_path):
    mbpo = _steps_to_solve(tmp_path, ["agent=latent_mbpo", "trainer.warmup_steps=500", "agent.updates_per_step=5",
                                      "agent.rollouts_per_step=100", "agent.model_init_train_steps=500"],
                           chunk=500, limit=3000)
    sac = _steps_to_solve(tmp_path, ["agent=sac", "trainer.warmup_steps=1000"], chunk=500, limit=8000)
    print(f"steps to eval return >= -400 on Pendulum-v1: latent_mbpo {mbpo}, sac {sac}")
    assert mbpo <= 3000, "latent_mbpo did not reach -400 within 3000 steps"
    assert mbpo <= 0.6 * sac, f"latent_mbpo needed {mbpo} steps, sac {sac}: expected clearly fewer"
