"""latent_mbrl: multi-step targets, which parameters each loss moves, the critic's coordinates,
every policy_learning mode, smoke runs on three envs, exact resume, bad input, and (slow) sample
efficiency against SAC on Pendulum."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import TINY, compose_cfg, train_run
from latentrl.agents.networks import soft_update
from latentrl.buffers import ReplayBuffer
from latentrl.config import ConfigError
from latentrl.envs import make_env

SMALL = ["agent=latent_mbrl", "agent.model_hidden_dims=[32,32]", "agent.hidden_dims=[32,32]", "agent.latent_dim=8",
         "agent.batch_size=32", "agent.buffer_size=2000", "agent.diagnostics_every=10"]


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


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


# ------------------------------------------------------------------------------------------ sequences
def test_sequences_follow_the_episode_and_stop_at_its_end():
    """obs[t] = t: every window's j-th observation is the start's (t + j)-th, the mask drops at the
    first episode end (termination or time-limit truncation) and stays down."""
    buf = ReplayBuffer(64, (1,), np.float32, 1, seed=0)
    t = 0
    for length, how in ((5, "terminated"), (4, "truncated"), (30, None)):
        for i in range(length):
            last = i == length - 1 and how is not None
            buf.add(np.array([t]), np.array([t]), float(t), np.array([t + 1]), last and how == "terminated",
                    last and how == "truncated")
            t += 1
        t += 1  # the next episode starts from a fresh observation value
        t += 100 if how else 0
    horizon = 3
    b = buf.sample_sequences(200, horizon)
    obs, mask, action = b["obs"][..., 0].numpy(), b["mask"].numpy(), b["action"][..., 0].numpy()
    for row in range(200):
        n_valid = int(mask[row].sum())
        assert np.all(mask[row, :n_valid] == 1) and np.all(mask[row, n_valid:] == 0)
        start = obs[row, 0]
        for j in range(n_valid + 1):
            assert obs[row, j] == start + j, "the j-th target observation is j env steps after the start"
        for j in range(n_valid):
            assert action[row, j] == start + j
        if n_valid < horizon:  # the window stopped: at an episode's final observation or the running one's current
            slot = (b["idx"][row] + n_valid) % buf.capacity
            assert not buf.valid[slot] and (buf.episode_last[slot] == slot or slot == buf.ptr)
    assert (mask.sum(1) < horizon).any() and (mask.sum(1) == horizon).any()
    term = b["terminated"].numpy()
    assert np.all(term <= mask), "no termination is reported past a window's end"


def test_multistep_targets_are_target_encoder_latents_of_the_right_observations():
    """The dynamics loss equals the masked error of the unrolled model against E_bar(s_{t+j}),
    with s_{t+j} read from the buffer by index (independently of sample_sequences)."""
    agent = make_agent(["agent.horizon=4", "agent.reward_weight=0", "agent.termination_weight=0"])
    with torch.no_grad():  # make the target encoder clearly different from the online one
        for p in agent.encoder_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = agent.replay.rng.bit_generator.state
    b = agent.replay.sample_sequences(32, 4)
    agent.replay.rng.bit_generator.state = state
    with torch.no_grad():
        z = agent.encoder(b["obs"][:, 0])
        expected, valid = 0.0, b["mask"].sum()
        for j in range(4):
            future = torch.as_tensor(agent.replay.obs[(b["idx"] + j + 1) % agent.replay.capacity])
            z, _, _ = agent.model(z, b["action"][:, j])
            target = agent.encoder_target(future)
            expected += (((z - target) ** 2).mean(-1) * b["mask"][:, j]).sum() / valid
    batch = agent.replay.sample_sequences(32, 4)
    z_bar = agent.encoder_target(batch["obs"].flatten(0, 1)).view(32, 5, -1).detach()
    metrics = agent.update_model(batch, z_bar)
    assert torch.allclose(metrics["loss/dynamics"], torch.as_tensor(expected), rtol=1e-5)


# ------------------------------------------------------------------------------------------ who moves what
def test_world_model_update_leaves_the_critic_inputs_until_the_target_encoder_moves():
    agent = make_agent()
    obs = torch.as_tensor(agent.replay.obs[:64])
    before = agent.latent(obs).clone()
    b = agent.replay.sample_sequences(32, agent.horizon)
    z_bar = agent.latent(b["obs"].flatten(0, 1)).view(32, agent.horizon + 1, -1)
    for _ in range(5):
        agent.update_model(b, z_bar)
    assert changed(params(agent.encoder_target), agent.encoder) , "the online encoder trains"
    assert torch.equal(agent.latent(obs), before), "critic/actor inputs moved with a world-model update"
    soft_update(agent.encoder_target, agent.encoder, agent.encoder_tau)
    assert not torch.equal(agent.latent(obs), before), "the target encoder's EMA step moves them"


def test_svg_actor_loss_moves_only_the_actor():
    agent = make_agent(["agent.policy_learning=svg", "agent.ensemble_size=3", "agent.num_elites=2"])
    others = {"encoder": agent.encoder, "encoder_target": agent.encoder_target, "model": agent.model,
              "model_target": agent.model_target,
              "critic": agent.sac.critic, "critic_target": agent.sac.critic_target}
    snap = {k: params(m) for k, m in others.items()}
    actor = params(agent.sac.actor)
    z0 = agent.latent(torch.as_tensor(agent.replay.obs[:32]))
    metrics = agent.update_actor_svg(z0)
    assert changed(actor, agent.sac.actor), "the actor did not move"
    for name, module in others.items():
        assert not changed(snap[name], module), f"{name} moved in the actor update"
        assert all(p.grad is None or not p.grad.any() for p in module.parameters()), f"{name} got gradients"
    assert torch.isfinite(metrics["train/imagined_value"])


def test_svg_gradient_flows_through_the_model():
    """The svg loss depends on the model's rewards: scaling the reward head changes the actor's gradient."""
    agent = make_agent(["agent.policy_learning=svg"])
    z0 = agent.latent(torch.as_tensor(agent.replay.obs[:32]))

    def actor_grad(a):
        torch.manual_seed(0)
        a.sac.actor_opt.step = lambda: None  # keep the parameters, read the gradient
        a.update_actor_svg(z0)
        return torch.cat([p.grad.flatten() for p in a.sac.actor.parameters()])

    other = copy.deepcopy(agent)
    with torch.no_grad():
        last = other.model.net.net[-1]
        last.weight[..., agent.model.latent_dim].mul_(50.0)  # the reward output
    assert not torch.allclose(actor_grad(agent), actor_grad(other))


def test_mbpo_model_rows_start_from_the_batch_target_latents():
    agent = make_agent(["agent.policy_learning=mbpo", "agent.model_share=0.25"])
    seen = {}
    original = agent.sac.update_critic

    def spy(feat, action, reward, next_feat, discount):
        seen.update(feat=feat, next_feat=next_feat, discount=discount)
        return original(feat, action, reward, next_feat, discount)

    agent.sac.update_critic = spy
    b = agent.replay.sample_sequences(32, agent.horizon)
    z_bar = agent.latent(b["obs"].flatten(0, 1)).view(32, agent.horizon + 1, -1)
    metrics = agent.update_critic(b, z_bar)
    assert metrics["model/share"] == 0.25
    assert torch.equal(seen["feat"], z_bar[:, 0]), "model rows branch from this batch's own target latents"
    assert torch.equal(seen["next_feat"][:24], z_bar[:24, 1]), "real rows bootstrap from E_bar(s')"
    assert not torch.allclose(seen["next_feat"][24:], z_bar[24:, 1]), "model rows bootstrap from f's prediction"


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("override,key", [("agent.policy_learning=dreamer", "policy_learning"),
                                          ("agent.horizon=0", "horizon"), ("agent.model_share=1.5", "model_share"),
                                          ("agent.n_step=9", "n_step"), ("agent.num_elites=3", "num_elites")])
def test_bad_config_values_name_the_key(override, key):
    with pytest.raises((ConfigError, InstantiationException), match=f"agent.{key}"):
        make_agent([override], fill=0)


# ------------------------------------------------------------------------------------------ runs
@pytest.mark.parametrize("overrides", [
    ["env=pendulum", "agent.policy_learning=svg", "agent.decoder=true"],
    ["env=pendulum", "agent.policy_learning=mbpo", "agent.ensemble_size=3", "agent.num_elites=2"],
    ["env=pendulum", "agent.policy_learning=none", "agent.n_step=3"],
    ["experiment=latent_mbrl_hopper", "trainer.warmup_steps=100"],
    ["env=carracing", "experiment=carracing_cpu", "agent.decoder=true", "trainer.total_steps=120",
     "trainer.warmup_steps=60", "env.max_episode_steps=200"],
])
def test_smoke(tmp_path, overrides):
    args = [*SMALL, *TINY, *overrides] if "experiment=latent_mbrl_hopper" not in overrides else \
        [*TINY, *overrides, *SMALL[1:]]
    train_run(args, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert np.isfinite(results["eval/return_mean"])
    logged = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        logged.update(json.loads(line))
    horizon = compose_cfg(args).agent.horizon
    for key in ("loss/dynamics", "loss/reward", "loss/critic", "loss/actor", "model/latent_err_1step_rel",
                f"model/latent_err_{horizon}step_rel", "model/imagined_return", "model/real_return",
                "model/encoder_drift_rel"):
        assert key in logged and np.isfinite(logged[key]), key


def test_resume_is_exact(tmp_path):
    exact = [*SMALL, "env=pendulum", "agent.policy_learning=mbpo", "agent.ensemble_size=2", "trainer.warmup_steps=100",
             "trainer.eval_every=0", "trainer.eval_episodes=1", "trainer.log_every=50", "trainer.checkpoint_every=0",
             "trainer.progress=false"]
    train_run([*exact, "trainer.total_steps=330"], tmp_path / "straight")
    train_run([*exact, "trainer.total_steps=230"], tmp_path / "split")  # mid-episode
    train_run([f"resume={tmp_path / 'split'}", "trainer.total_steps=330"], tmp_path / "unused")
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["agent"]
            for r in ("straight", "split"))
    assert a["extra"] == b["extra"] and a["extra"]["num_updates"] == 230
    for key in a["modules"]:
        assert torch.equal(a["modules"][key], b["modules"][key]), f"{key} differs after resume"
    bufs = [torch.load(tmp_path / r / "checkpoints" / "buffers.pt", weights_only=True)["buffers"]["replay"]
            for r in ("straight", "split")]
    for key, val in bufs[0].items():
        if torch.is_tensor(val):
            assert torch.equal(val, bufs[1][key]), f"replay.{key} differs after resume"


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
def test_latent_mbrl_learns_pendulum_faster_than_sac(tmp_path):
    """With 3-step returns latent_mbrl reaches -400 in 1,500 env steps, sac in 2,500 (both warm up for 500
    random steps); with 1-step returns it needs 3,500 (svg: 3,000), more than sac (measured on this machine
    kind). The Pendulum claim therefore rests on n-step returns; HalfCheetah/Hopper results are in the README."""
    mbrl = _steps_to_solve(tmp_path, ["agent=latent_mbrl", "trainer.warmup_steps=500", "agent.n_step=3"],
                           chunk=500, limit=4000)
    sac = _steps_to_solve(tmp_path, ["agent=sac", "trainer.warmup_steps=500"], chunk=500, limit=8000)
    print(f"steps to eval return >= -400 on Pendulum-v1: latent_mbrl {mbrl}, sac {sac}")
    assert mbrl <= 4000, "latent_mbrl did not reach -400 within 4000 steps"
    assert mbrl <= 0.7 * sac, f"latent_mbrl needed {mbrl} steps, sac {sac}: expected clearly fewer"
