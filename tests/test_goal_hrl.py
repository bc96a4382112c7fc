"""agent=goal_hrl: rewards, HER relabeling, high-level windows, planning, smoke runs, exact resume, learning."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import TINY, compose_cfg, train_run
from latentrl.agents.goal_hrl import ContrastiveReward, cosine_reward, direction_reward, distance_reward
from latentrl.config import ConfigError
from latentrl.envs import make_env

BAD_CONFIG = (ConfigError, InstantiationException)  # hydra wraps the agent's ConfigError, message kept
FAST = ["agent.batch_size=32", "agent.high.batch_size=16", "agent.low.hidden_dims=[64,64]",
        "agent.high.hidden_dims=[64,64]", "agent.model.hidden_dims=[64,64]", "agent.decoder.hidden_dims=[64]",
        "agent.goal_dim=16", "agent.buffer_size=5000"]


def build_agent(*overrides, env="pendulum"):
    cfg = compose_cfg(["agent=goal_hrl", f"env={env}", *FAST, *overrides])
    env = make_env(cfg.env)
    encoder = instantiate(cfg.encoder, obs_space=env.observation_space)
    agent = instantiate(cfg.agent, encoder=encoder, obs_space=env.observation_space, action_space=env.action_space,
                        device="cpu", seed=0, _recursive_=False)
    return agent, env


def collect(agent, env, steps, random=True, seed=0):
    """Drive the agent like the trainer does; returns the per-episode lists of observations."""
    episodes, obs = [], env.reset(seed=seed)[0]
    agent.begin_episode(True)
    episodes.append([obs])
    for _ in range(steps):
        action = agent.act_random(obs) if random else agent.act(obs, explore=True)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        agent.observe(obs, action, float(reward), next_obs, terminated, truncated)
        episodes[-1].append(next_obs)
        obs = next_obs
        if terminated or truncated:
            obs = env.reset()[0]
            agent.begin_episode(True)
            episodes.append([obs])
    return episodes


# ----------------------------------------------------------------------------- units
def test_reach_reward_counts_steps_and_ends_the_goal_episode_where_reached():
    """reward=reach (SoRB): -1 until E(s') is within reach_radius x the k-step motion of the goal, 0
    there, and the critic does not bootstrap past a reached goal (nor past an env termination)."""
    agent, env = build_agent("agent.reward=reach", "agent.low.reach_radius=0.5")
    agent.motion.update(torch.tensor(0.2))  # k-step motion 0.2 per dim: reached within 0.1 RMS per dim
    goal = torch.zeros(3, agent.goal_dim)
    achieved = torch.stack([torch.full((agent.goal_dim,), v) for v in (0.05, 0.099, 0.2)])
    assert torch.equal(agent.goal_reward(achieved, goal), torch.tensor([0.0, 0.0, -1.0]))
    agent.low_extrinsic = 1.0  # the -1/0 goal reward is kept as it is; the env reward is still normalised
    mixed = agent.worker_reward(torch.tensor([0.0, -1.0]), torch.tensor([4.0, -4.0]))
    assert torch.allclose(mixed, torch.tensor([0.0, -1.0]) + torch.tensor([4.0, -4.0]) / agent.env_reward_spread.value)
    assert agent.env_reward_spread.ready and not agent.goal_reward_spread.ready
    agent.low_extrinsic = 0.0
    collect(agent, env, 400)
    seen = {}
    core_loss = agent.low.critic_loss

    def spy(feat, action, reward, next_feat, discount):
        seen.update(reward=reward, discount=discount)
        return core_loss(feat, action, reward, next_feat, discount)

    agent.low.critic_loss = spy
    agent.motion.update(torch.tensor(0.2))
    agent.np_rng = np.random.default_rng(1)
    agent.update(400)
    reached = seen["reward"] == 0.0
    assert set(seen["reward"].unique().tolist()) <= {-1.0, 0.0} and reached.any() and (~reached).any()
    assert torch.all(seen["discount"][reached] == 0.0)  # reached: no bootstrap
    assert torch.allclose(seen["discount"][~reached], torch.tensor(agent.low.gamma))  # pendulum never terminates


def test_distance_and_cosine_rewards():
    achieved = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    goal = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    assert torch.allclose(distance_reward(achieved, goal), torch.tensor([0.0, -8.0]))  # -||.||^2 / d
    assert torch.allclose(cosine_reward(achieved, goal), torch.tensor([1.0, -1.0]))


def test_direction_reward_pays_aim_not_size_and_does_not_tax_motion():
    """reward=direction: cos(E(s') - E(s), g - E(s)). A step at the goal earns 1 whatever its size; steps
    the worker cannot aim (isotropic) earn ~0 on average, while the distance reward's average falls with
    their size, which pays a worker to stand still when moving (driving) shakes the latent."""
    start, goal = torch.zeros(3, 2), torch.tensor([[1.0, 0.0]] * 3)
    achieved = torch.tensor([[1e-3, 0.0], [0.0, 5.0], [-2.0, 0.0]])  # tiny step at it, orthogonal, away
    assert torch.allclose(direction_reward(start, achieved, goal), torch.tensor([1.0, 0.0, -1.0]), atol=1e-5)
    torch.manual_seed(0)
    start, goal = torch.zeros(20000, 8), 0.1 * torch.randn(20000, 8)
    for size in (0.01, 1.0):
        achieved = start + size * torch.randn(20000, 8)
        assert abs(float(direction_reward(start, achieved, goal).mean())) < 0.02
    small, large = (float(distance_reward(start + s * torch.randn(20000, 8), goal).mean()) for s in (0.01, 1.0))
    assert large < small - 0.5  # the distance reward taxes the same aimless motion


def test_direction_reward_in_update_measures_the_step_from_the_ema_latent_of_s():
    agent, env = build_agent("agent.reward=direction")
    collect(agent, env, 60)
    seen = {}
    orig_sample, orig_reward = agent.sample_low, agent.goal_reward

    def sample_low():
        seen["batch"] = orig_sample()
        return seen["batch"]

    def goal_reward(achieved, goal, start=None):  # called before any optimiser step of this update
        with torch.no_grad():
            seen["expected_start"] = agent.target_goals(seen["batch"]["obs"])[1]
            seen["expected_achieved"] = agent.target_goals(seen["batch"]["next_obs"])[1]
        seen["args"] = (achieved, goal, start)
        return orig_reward(achieved, goal, start)

    agent.sample_low, agent.goal_reward = sample_low, goal_reward
    agent.update(100)
    achieved, goal, start = seen["args"]
    assert start is not None
    assert torch.allclose(start, seen["expected_start"])  # E_ema(s), not the online encoder, not s'
    assert torch.allclose(achieved, seen["expected_achieved"])
    assert not torch.allclose(start, achieved)


def test_contrastive_reward_learns_to_score_matching_pairs():
    torch.manual_seed(0)
    critic = ContrastiveReward(goal_dim=4, hidden_dims=(32,), embed_dim=8, temperature=0.1)
    goals = torch.randn(16, 4)
    achieved = goals + 0.05 * torch.randn(16, 4)
    r0 = critic.reward(achieved, goals)
    expected = critic.logits(achieved, goals).diagonal() * critic.temperature  # the pair's own similarity
    assert torch.allclose(r0, expected, atol=1e-6) and r0.abs().max() <= 1.0 + 1e-6
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    for _ in range(60):
        loss = critic.loss(achieved, goals)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        matched = critic.reward(achieved, goals).mean()
        shuffled = critic.reward(achieved, goals.roll(1, 0)).mean()
    assert matched > 0.8 and matched > shuffled + 0.5


@pytest.mark.parametrize("override, match", [
    ("agent.reward=euclid", "distance, cosine, direction, contrastive, reach"),
    ("agent.high.correction=hiro2", "hac, none"),
    ("agent.high.goal_space=polar", "relative, absolute"),
    ("agent.low.relabel_fraction=1.5", "relabel_fraction"),
    ("agent.planning.candidates=-1", "candidates"),
    ("agent.high.motion_stat=mean", "motion_stat.*rms, median"),
    ("agent.high.motion_source=buffer", "motion_source.*replay, recent"),
    ("agent.high.motion_windows=0", "motion_windows must be >= 1"),
    ("agent.low.goal_input=relative", "goal_input.*absolute, offset"),
    ("agent.low.goal_spread=mad", "goal_spread.*std, iqr"),
])
def test_unknown_config_values_name_the_allowed_ones(override, match):
    with pytest.raises(BAD_CONFIG, match=match):
        build_agent(override)


def test_her_goals_are_target_encodings_of_later_observations_of_the_same_episode():
    agent, env = build_agent("agent.low.relabel_fraction=1.0", "env.max_episode_steps=30")
    collect(agent, env, 100)
    b = agent.sample_low()
    idx, future = b["idx"], b["future_idx"]
    assert b["relabeled"].all()
    assert (agent.replay.episode[future] == agent.replay.episode[idx]).all()
    assert ((future - idx) % agent.replay.capacity >= 1).all()
    expected = agent.target_goals(torch.as_tensor(agent.replay.obs[future]))[1]
    assert torch.allclose(b["goal"], expected)
    # with relabeling off, the pursued goals come back (re-derived from their window start and u)
    agent.low_relabel = 0.0
    b = agent.sample_low()
    assert torch.equal(b["goal"], agent.stored_goals(b["idx"]))


@pytest.mark.parametrize("horizon", [None, 3])
def test_her_goals_stay_within_the_configured_horizon_of_the_same_episode(horizon):
    agent, env = build_agent("agent.low.relabel_fraction=1.0", "agent.k=5", "env.max_episode_steps=40",
                             f"agent.low.her_horizon={'null' if horizon is None else horizon}")
    collect(agent, env, 150)  # three full episodes and one running
    limit = horizon or agent.k
    rb = agent.replay
    idx = rb.sample_idx(4000)
    future = agent.sample_future(idx)
    ahead = (future - idx) % rb.capacity
    assert (rb.episode[future] == rb.episode[idx]).all()
    assert ahead.min() == 1 and ahead.max() == limit  # the whole horizon is used, never more
    last = np.where(rb.episode_last[idx] >= 0, rb.episode_last[idx], rb.ptr)
    assert (ahead <= (last - idx) % rb.capacity).all()  # never past the episode's final observation
    b = agent.sample_low()  # the batches the worker trains on use it
    assert ((b["future_idx"] - b["idx"]) % rb.capacity <= limit).all()


def test_stored_goals_are_derived_at_sample_time_from_the_current_ema_encoder():
    agent, env = build_agent("agent.k=4", "agent.low.relabel_fraction=0.0", "env.max_episode_steps=30")
    episodes = collect(agent, env, 70)
    rb = agent.replay
    slots = np.flatnonzero(rb.valid[:rb.size])
    # the first transition of each episode sits at slot 0 and right after the previous episode's final obs
    first = {0: 0}
    for i, ep in enumerate(episodes[:-1]):
        first[i + 1] = first[i] + len(ep)
    with torch.no_grad():  # the encoder moves after the data was collected: goals must follow it
        for p in agent.goal_encoder_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b = agent.sample_low()
    idx = b["idx"]
    ep = rb.episode[idx]
    t = idx - np.array([first[e] for e in ep])  # step within the episode
    start_obs = np.stack([episodes[e][s - s % agent.k] for e, s in zip(ep, t)])  # windows start every k steps
    start = agent.target_goals(torch.as_tensor(start_obs))[1]
    u = torch.as_tensor(rb.extras["goal_action"][idx])
    expected = (start + agent.goal_scale * u).clamp(-1, 1)
    assert torch.allclose(b["goal"], expected, atol=1e-6)
    assert len(slots) == 70 and set(np.unique(rb.extras["goal_age"][slots])) == {0, 1, 2, 3}


class ScriptedEnv:
    """Rewards 1, 2, 3, ...; ends after `length` steps, terminated or truncated."""

    def __init__(self, length, terminated):
        self.length, self.terminated, self.t = length, terminated, 0

    def reset(self, seed=None):
        self.t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        done = self.t >= self.length
        return np.full(3, self.t, np.float32), float(self.t), done and self.terminated, done and not self.terminated, {}


def test_high_level_window_sums_its_k_rewards_and_stops_at_episode_end():
    agent, _ = build_agent("agent.k=3")
    collect(agent, ScriptedEnv(7, terminated=True), 7)
    collect(agent, ScriptedEnv(4, terminated=False), 4)
    hr = agent.high_replay
    slots = np.flatnonzero(hr.valid[:hr.size])
    assert hr.reward[slots].tolist() == [1 + 2 + 3, 4 + 5 + 6, 7, 1 + 2 + 3, 4]
    assert hr.extras["steps"][slots].tolist() == [3, 3, 1, 3, 1]
    assert hr.terminated[slots].tolist() == [False, False, True, False, False]  # truncation bootstraps
    # next observations are the window ends, and each window carries the goal pursued during it
    assert [hr.obs[(s + 1) % hr.capacity][0] for s in slots] == [3, 6, 7, 3, 4]
    low_goals = agent.stored_goals(np.flatnonzero(agent.replay.valid[:agent.replay.size])).numpy()
    start = agent.target_goals(torch.as_tensor(hr.obs[slots[:1]]))[1]
    assert torch.allclose(agent.goal_from_action(start, torch.as_tensor(hr.action[slots[:1]]))[0],
                          torch.as_tensor(low_goals[0]), atol=1e-6)  # the high-level action is the goal pursued (float32: batched vs single encodings round apart)
    assert np.array_equal(low_goals[0], low_goals[2])
    assert not np.array_equal(low_goals[2], low_goals[3])  # a new goal every k steps
    assert agent.pending is None


def test_high_level_batch_hindsight_actions_and_miss_penalty():
    agent, env = build_agent("agent.high.relabel_fraction=1.0", "agent.high.reach_penalty=2.0",
                             "agent.high.reward_scale=0.5")
    collect(agent, env, 60)
    hb = agent.sample_high()
    start = agent.target_goals(hb["obs"])[1]
    achieved = agent.target_goals(hb["next_obs"])[1]
    assert torch.allclose(hb["action"], agent.action_from_goal(start, achieved))  # HAC: the goal reached
    reached = (achieved - start).abs().max(-1).values <= agent.goal_scale  # reachable by an action in [-1, 1]
    assert torch.allclose(hb["missed"][reached], torch.zeros(int(reached.sum())), atol=1e-6)
    agent.high_relabel = 0.0  # no relabeling: the stored proposal pays for its miss
    hb = agent.sample_high()
    start = agent.target_goals(hb["obs"])[1]
    proposed = agent.goal_from_action(start, hb["stored_action"])
    missed = (agent.target_goals(hb["next_obs"])[1] - proposed).pow(2).mean(-1)
    idx = hb["idx"]
    assert torch.allclose(hb["reward"], 0.5 * torch.as_tensor(agent.high_replay.reward[idx]) - 2.0 * missed, atol=1e-5)
    assert torch.allclose(hb["discount"], agent.high_gamma ** hb["steps"].float() * (1 - hb["terminated"]))


def test_normalized_miss_penalty_counts_motions_and_prices_in_reward_spreads():
    """high.normalize_penalty: a miss of one k-step motion (per dim, squared) costs reach_penalty x the
    window reward's spread, so the price follows the env's reward scale (raw: ~0 on CarRacing)."""
    agent, env = build_agent("agent.high.normalize_penalty=true", "agent.high.reach_penalty=2.0",
                             "agent.high.relabel_fraction=0.0")
    collect(agent, env, 60)
    agent.motion.update(torch.tensor(0.1))
    agent.window_reward_spread.update(torch.tensor(5.0))
    missed = torch.tensor([0.0, 0.01, 0.04])  # 0, 1 and 2 motions away (mean squared per dim)
    assert torch.allclose(agent.miss_cost(missed, 2.0), torch.tensor([0.0, 10.0, 40.0]), rtol=1e-4)
    hb = agent.sample_high()  # the batch's own reward spread enters the running spread first
    spread, motion = float(agent.window_reward_spread.value), float(agent.k_step_motion)
    raw = torch.as_tensor(agent.high_replay.reward[hb["idx"]])
    assert 5.0 != spread and motion > 0
    expected = raw - 2.0 * spread * hb["missed"] / motion ** 2
    assert torch.allclose(hb["reward"], expected, rtol=1e-4, atol=1e-4)
    assert float(hb["missed"].max()) > 0  # nothing relabeled: proposals pay, the check has teeth
    agent.normalize_penalty = False
    assert torch.equal(agent.miss_cost(missed, 2.0), 2.0 * missed)


def test_miss_clip_bounds_the_normalised_miss_cost():
    """high.miss_clip: a miss counts at most that many k-step motions^2, so one huge window (CarRacing's
    episode-start zoom) costs a few spreads, not ~100; misses below the bound are priced as before."""
    agent, env = build_agent("agent.high.normalize_penalty=true", "agent.high.miss_clip=4.0")
    agent.motion.update(torch.tensor(0.1))
    agent.window_reward_spread.update(torch.tensor(5.0))
    missed = torch.tensor([0.01, 0.03, 0.04, 0.05, 10.0])  # 1, 3, 4, 5 and 1000 motions^2
    assert torch.allclose(agent.miss_cost(missed, 2.0), torch.tensor([10.0, 30.0, 40.0, 40.0, 40.0]), rtol=1e-4)
    agent.miss_clip = None
    assert float(agent.miss_cost(missed, 2.0)[-1]) > 9e3  # unbounded without it: 1000 motions^2


def test_manager_discount_is_per_step_consistent():
    agent, _ = build_agent("agent.k=5", "agent.low.gamma=0.9")
    assert agent.high_gamma == 0.9  # default: the worker's per-step discount
    collect(agent, ScriptedEnv(12, terminated=False), 12)  # windows of 5, 5 and 2 steps
    hb = agent.high_replay.gather(np.flatnonzero(agent.high_replay.valid[:agent.high_replay.size]))
    agent.high_replay.sample = lambda n, device: hb  # that batch, in order
    assert torch.allclose(agent.sample_high()["discount"], torch.tensor([0.9 ** 5, 0.9 ** 5, 0.9 ** 2]))
    agent, _ = build_agent("agent.k=5", "agent.high.gamma=0.99")
    assert agent.high_gamma == 0.99


def test_worker_reward_terms_are_normalised_by_their_running_spread():
    agent, _ = build_agent("agent.low.extrinsic_weight=2.0", "agent.low.reward_scale=0.5")
    gen = torch.Generator().manual_seed(0)
    goal_r, env_r = 0.01 * torch.randn(256, generator=gen), 3.0 * torch.randn(256, generator=gen) + 1.0
    r = agent.worker_reward(goal_r, env_r)  # first batch: the running spreads are its own std
    # atol: the spread's 1e-6 guard shifts a goal reward of std 0.01 by ~1e-4 of itself
    assert torch.allclose(r, 0.5 * goal_r / goal_r.std() + 2.0 * env_r / env_r.std(), rtol=1e-3, atol=1e-3)
    agent.normalize_env_reward = False  # normalize_rewards=goal: the env reward stays raw
    assert torch.allclose(agent.worker_reward(goal_r, env_r), 0.5 * goal_r / goal_r.std() + 2.0 * env_r,
                          rtol=1e-3, atol=1e-3)
    agent.normalize_goal_reward = False
    assert torch.allclose(agent.worker_reward(goal_r, env_r), 0.5 * goal_r + 2.0 * env_r)


def test_normalize_rewards_goal_keeps_the_env_reward_raw_and_bad_values_are_one_line():
    agent, _ = build_agent("agent.low.normalize_rewards=goal")
    assert agent.normalize_goal_reward and not agent.normalize_env_reward
    agent, _ = build_agent("agent.low.normalize_rewards=false")
    assert not agent.normalize_goal_reward and not agent.normalize_env_reward
    with pytest.raises(BAD_CONFIG, match="agent.low.normalize_rewards"):
        build_agent("agent.low.normalize_rewards=env")


def test_goal_weight_is_zero_before_its_start_and_ramps_to_reward_scale():
    agent, env = build_agent("agent.low.reward_scale=0.5", "agent.low.goal_weight_from=100",
                             "agent.low.goal_weight_ramp=200")
    assert [agent.goal_weight(s) for s in (0, 99, 100, 200, 300, 10_000)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.5]
    gen = torch.Generator().manual_seed(0)
    goal_r, env_r = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    agent.low_extrinsic = 1.0
    assert torch.allclose(agent.worker_reward(goal_r, env_r, agent.goal_weight(50)), env_r / env_r.std(), atol=1e-4)
    collect(agent, env, 60)
    assert agent.update(step=150)["goal/reward_weight"] == pytest.approx(0.125)
    with pytest.raises(BAD_CONFIG, match="agent.low.goal_weight_from"):
        build_agent("agent.low.goal_weight_ramp=-1")


def test_split_critics_learn_env_and_goal_returns_apart_with_their_own_discounts():
    """split_critics: the env critic's targets hold only the weighted env reward (discount low.gamma),
    the goal critic's only the normalised goal reward (discount goal_gamma, default 1 - 1/k)."""
    agent, env = build_agent("agent.low.split_critics=true", "agent.low.extrinsic_weight=2.0", "agent.k=5")
    assert agent.goal_gamma == pytest.approx(0.8) and "low_goal_critic" in agent.optimizers
    collect(agent, env, 60)
    seen = {}
    env_loss, goal_loss = agent.low.critic_loss, agent.goal_critic_loss
    agent.low.critic_loss = lambda *a: seen.setdefault("env", a) and env_loss(*a)
    agent.goal_critic_loss = lambda *a: seen.setdefault("goal", a) and goal_loss(*a)
    goal_reward, sample = agent.goal_reward, agent.sample_low
    agent.goal_reward = lambda *a: seen.setdefault("goal_r", goal_reward(*a))
    agent.sample_low = lambda: seen.setdefault("batch", sample())
    before = [p.clone() for p in agent.goal_critic.parameters()]
    metrics = agent.update(step=100)
    b, goal_r = seen["batch"], seen["goal_r"]
    env_r = b["reward"] / (agent.env_reward_spread.value + 1e-6)  # one batch: the spread is its own std
    assert torch.allclose(seen["env"][2], 2.0 * env_r)  # no goal term
    assert torch.allclose(seen["goal"][2], goal_r / (agent.goal_reward_spread.value + 1e-6))  # no env term
    assert torch.allclose(seen["env"][4], agent.low.gamma * (1 - b["terminated"]))
    assert torch.allclose(seen["goal"][4], 0.8 * (1 - b["terminated"]))
    assert torch.equal(seen["env"][0], seen["goal"][0]) and torch.equal(seen["env"][3], seen["goal"][3])
    assert any(not torch.equal(p, q) for p, q in zip(before, agent.goal_critic.parameters()))
    assert "loss/low_goal_critic" in metrics and metrics["train/low_goal_q_ratio"] > 0
    for bad, match in [(["agent.low.extrinsic_weight=0"], "extrinsic_weight > 0"),
                       (["agent.low.extrinsic_weight=1", "agent.reward=reach"], "reward=reach")]:
        with pytest.raises(BAD_CONFIG, match=match):
            build_agent("agent.low.split_critics=true", *bad)


@pytest.mark.parametrize("weight", [None, 0.0])
def test_goal_critic_gradient_into_the_encoder_follows_goal_encoder_weight(weight):
    """goal_encoder_weight=0: the shared encoder takes the same step whatever the goal critic is
    (its loss reaches only its own weights); unscaled (null) a different goal critic moves it
    differently. The weight reported is the configured one shrunk by the running loss ratio."""
    extra = [] if weight is None else [f"agent.low.goal_encoder_weight={weight}"]
    agent, env = build_agent("agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0",
                             "agent.high.critic_trains_encoder=false", *extra)
    agent.f_weight, agent.recon_weight = 0.0, 0.0  # only the worker's two critics train the encoder
    collect(agent, env, 60)
    twin = copy.deepcopy(agent)
    with torch.no_grad():  # another goal critic: other goal losses and gradients
        for p in twin.goal_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
    encoders = []
    for a in (agent, twin):
        torch.manual_seed(1)
        metrics = a.update(step=100)
        encoders.append([p.clone() for p in a.goal_encoder.trunk.parameters()])
    same = all(torch.equal(p, q) for p, q in zip(*encoders))
    assert same == (weight == 0.0)
    assert ("goal/low_goal_encoder_weight" in metrics) == (weight is not None)


def test_goal_encoder_weight_is_shrunk_by_the_loss_ratio_and_validated():
    agent, _ = build_agent("agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0",
                           "agent.low.goal_encoder_weight=0.5")
    ref, scale = type(agent.env_loss_scale)(), type(agent.goal_loss_scale)()
    assert agent.balanced_encoder_weight(0.5, ref, torch.tensor(2.0), scale, torch.tensor(20.0)) == pytest.approx(0.05)
    assert agent.balanced_encoder_weight(0.5, type(ref)(), torch.tensor(2.0), type(scale)(), torch.tensor(1.0)) == 0.5
    for bad in (["agent.low.goal_encoder_weight=0.5"],  # without split critics
                ["agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0", "agent.low.goal_encoder_weight=-1"]):
        with pytest.raises(BAD_CONFIG, match="agent.low.goal_encoder_weight"):
            build_agent(*bad)


OWN = ["agent.low.own_encoder=true", "agent.planning.candidates=0", "agent.low.split_critics=true",
       "agent.low.extrinsic_weight=1.0"]


@pytest.mark.parametrize("own", [False, True])
def test_own_worker_encoder_is_trained_by_the_worker_critics_and_read_by_its_actor(own):
    """low.own_encoder: the worker's critics train its own encoder and leave the goal encoder's trunk
    as it was (only f, decoder, inverse head and manager shape that one); shared, the same critic
    losses move the goal encoder. The worker acts on its own encoder's features."""
    agent, env = build_agent(*(OWN if own else OWN[1:]), "agent.high.critic_trains_encoder=false")
    agent.f_weight, agent.recon_weight = 0.0, 0.0  # only the worker's two critics train any encoder
    assert (agent.worker_encoder is not None) == own
    collect(agent, env, 60)
    trunk = [p.clone() for p in agent.goal_encoder.trunk.parameters()]
    agent.update(step=100)
    trunk_moved = any(not torch.equal(p, q) for p, q in zip(trunk, agent.goal_encoder.trunk.parameters()))
    assert trunk_moved != own
    if own:
        obs = env.reset(seed=3)[0]
        agent.begin_episode(False)
        before = agent.act(obs, explore=False)
        with torch.no_grad():
            for p in agent.worker_encoder.parameters():
                p.add_(0.5 * torch.randn_like(p))
        agent.state[False]["t"] = 0  # same window: the goal stays, only the worker's features differ
        assert not np.allclose(agent.act(obs, explore=False), before)


def test_own_worker_encoder_on_pixels_and_validated():
    agent, env = build_agent(*OWN, "env.resize=32", "env.frame_stack=2", "env.grayscale=true", env="carracing")
    collect(agent, env, 20)
    worker = [p.clone() for p in agent.worker_encoder.parameters()]
    metrics = agent.update(0)
    assert np.isfinite(float(metrics["loss/low_critic"]))
    assert any(not torch.equal(p, q) for p, q in zip(worker, agent.worker_encoder.parameters()))
    with pytest.raises(BAD_CONFIG, match="agent.low.own_encoder=true needs agent.planning.candidates=0"):
        build_agent("agent.low.own_encoder=true")


def test_goal_phase_opens_when_the_workers_returns_reach_the_threshold_and_stays_open():
    """low.goal_phase_return: until the mean of the last goal_phase_episodes training returns reaches
    it, the actor is blind to its goal (acting, targets and its loss alike) and the goal weight is 0;
    the update that sees the mean cross it opens the phase, and input and weight ramp in together."""
    agent, env = build_agent("agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0",
                             "agent.low.reward_scale=0.5", "agent.low.goal_phase_return=0.0",
                             "agent.low.goal_phase_episodes=2", "agent.low.goal_weight_ramp=100")
    collect(agent, env, 60)  # pendulum: ~-5 per step, no episode ends
    feat = torch.randn(16, agent.low.actor.actor.net[0].in_features)
    moved_goal = feat.clone()
    moved_goal[:, -agent.goal_dim:] += 3.0

    def acts(x):
        return agent.low.actor(x, deterministic=True, with_log_prob=False)[0]

    def end_episode(reward):
        obs = env.reset(seed=0)[0]
        agent.observe(obs, np.zeros(1, np.float32), reward, obs, False, True)

    metrics = agent.update(100)
    assert metrics["goal/phase_open"] == 0.0 and metrics["goal/reward_weight"] == 0.0
    assert torch.equal(acts(feat), acts(moved_goal))  # goal-blind
    assert float(metrics["goal/worker_goal_sensitivity"]) == 0.0
    end_episode(3.0)  # the first episode's return is the 60 collected steps' (< 0) plus 3
    end_episode(3.0)  # one good episode: the mean of the last two is still < 0
    assert agent.recent_returns[-1] == 3.0 and agent.recent_returns[0] < 0
    assert agent.update(150)["goal/phase_open"] == 0.0 and agent.goal_phase_from is None
    end_episode(3.0)
    metrics = agent.update(200)
    assert agent.recent_returns == [3.0, 3.0] and agent.goal_phase_from == 200
    assert metrics["goal/phase_open"] == 1.0 and metrics["goal/actor_goal_input"] == 0.0  # ramps from here
    assert agent.update(250)["goal/reward_weight"] == pytest.approx(0.25)
    assert float(agent.low.actor.mix) == pytest.approx(0.5)
    end_episode(-500.0)
    end_episode(-500.0)  # returns falling again do not close it
    metrics = agent.update(300)
    assert agent.goal_phase_from == 200 and metrics["goal/reward_weight"] == pytest.approx(0.5)
    assert metrics["goal/actor_goal_input"] == 1.0 and not torch.equal(acts(feat), acts(moved_goal))
    for bad, match in ((["agent.low.goal_phase_return=0.0"], "needs agent.low.split_critics=true"),
                       (["agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0", "agent.low.goal_phase_return=0",
                         "agent.low.goal_weight_from=10"], "agent.low.goal_weight_from"),
                       (["agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0", "agent.low.goal_phase_return=0",
                         "agent.low.goal_phase_episodes=0"], "agent.low.goal_phase_episodes must be >= 1")):
        with pytest.raises(BAD_CONFIG, match=match):
            build_agent(*bad)


@pytest.mark.parametrize("goal_weight", [0.0, 0.5])
def test_split_actor_adds_the_goal_critic_only_by_its_weight(goal_weight):
    """At weight 0 the worker's actor takes exactly SAC's step on the env critic; at 0.5 it moves
    toward the goal critic's actions too, Q_goal rescaled to Q_env's running magnitude."""
    agent, env = build_agent("agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0")
    collect(agent, env, 60)
    agent.update(step=100)
    twin = copy.deepcopy(agent)
    feat = torch.randn(32, agent.low.actor.net[0].in_features)
    torch.manual_seed(1)
    agent.update_split_actor(feat, goal_weight)
    torch.manual_seed(1)
    twin.low.update_actor_and_alpha(feat)
    same = all(torch.equal(p, q) for p, q in zip(agent.low.actor.parameters(), twin.low.actor.parameters()))
    assert same == (goal_weight == 0.0)
    assert agent.env_q_scale.ready and agent.goal_q_scale.ready


def test_goal_blind_track_critic_ignores_the_goal_and_the_actor_unlearns_it():
    """low.track_critic_reads_goal=false: Q_env(s, a) is the same whatever goal sits beside s (the goal
    critic still reads it), so at goal weight 0 the actor is pulled toward one action per state for
    every goal; reading the goal, the critic can tell goals apart."""
    base = ("agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0")
    agent, env = build_agent(*base, "agent.low.track_critic_reads_goal=false")
    seeing, _ = build_agent(*base)
    feat_dim = agent.low.actor.net[0].in_features - agent.goal_dim
    assert agent.low.critic.q.net[0].weight.shape[1] == feat_dim + agent.action_dim  # goal columns not even wired
    collect(agent, env, 60)
    collect(seeing, env, 60)
    for a in (agent, seeing):
        a.update(step=100)
    gen = torch.Generator().manual_seed(0)
    h, action = torch.randn(16, feat_dim, generator=gen), torch.rand(16, agent.action_dim, generator=gen) * 2 - 1
    g1, g2 = torch.randn(16, agent.goal_dim, generator=gen), torch.randn(16, agent.goal_dim, generator=gen)
    with torch.no_grad():
        assert torch.equal(agent.low.q(torch.cat([h, g1], 1), action), agent.low.q(torch.cat([h, g2], 1), action))
        assert not torch.equal(agent.goal_critic(torch.cat([h, g1], 1), action),
                               agent.goal_critic(torch.cat([h, g2], 1), action))
        assert not torch.equal(seeing.low.q(torch.cat([h, g1], 1), action), seeing.low.q(torch.cat([h, g2], 1), action))
    # actor step at goal weight 0: the gradient on the actor's output is the same for every goal
    x = torch.cat([h.repeat(2, 1), torch.cat([g1, g2])], 1)
    act = (torch.rand(16, agent.action_dim, generator=gen) * 2 - 1).repeat(2, 1).requires_grad_()
    agent.low.q(x, act).min(0).values.sum().backward()
    assert torch.allclose(act.grad[:16], act.grad[16:])
    for bad, match in [(["agent.low.track_critic_reads_goal=false"], "split_critics=true"),
                       ([*base, "agent.low.track_critic_reads_goal=false", "agent.planning.method=graph"], "graph")]:
        with pytest.raises(BAD_CONFIG, match=match):
            build_agent(*bad)


def test_worker_sensitivity_reads_zero_for_a_worker_that_ignores_its_goal():
    agent, env = build_agent()
    collect(agent, env, 60)
    metrics = agent.update(step=100)
    assert metrics["goal/worker_goal_sensitivity"] > 0 and metrics["goal/worker_state_sensitivity"] > 0
    first = agent.low.actor.net[0]
    n_feat = first.in_features - agent.goal_dim
    with torch.no_grad():
        first.weight[:, n_feat:] = 0.0  # the actor no longer reads the goal
    x = torch.randn(32, first.in_features, generator=torch.Generator().manual_seed(0))
    out = agent.worker_sensitivity(x)
    assert out["goal/worker_goal_sensitivity"] == 0.0 and out["goal/worker_state_sensitivity"] > 1e-4


def test_manager_critic_gradient_into_the_encoder_is_balanced():
    agent, env = build_agent("agent.high.encoder_weight=0.5")
    collect(agent, env, 60)
    agent.low_loss_scale.update(torch.tensor(2.0))
    agent.high_loss_scale.update(torch.tensor(400.0))
    assert agent.high_encoder_grad_weight() == pytest.approx(0.5 * 2.0 / 400.0)
    agent.high_loss_scale = type(agent.high_loss_scale)()
    agent.high_loss_scale.update(torch.tensor(1.0))  # a manager loss below the worker's is not scaled up
    assert agent.high_encoder_grad_weight() == pytest.approx(0.5)
    agent.high_trains_encoder = False
    assert agent.high_encoder_grad_weight() == 0.0
    agent.high_trains_encoder = True
    # in update(): the critic learns at full rate, only the encoder's share of its gradient shrinks
    grads = {}
    for w in (1.0, 0.25):
        torch.manual_seed(0)  # same networks, same samples
        a, e = build_agent(f"agent.high.encoder_weight={w}")
        collect(a, e, 60)
        a.low_loss_scale.update(torch.tensor(1e9))  # ratio capped at 1: weight = encoder_weight
        a.model_opt.step = a.low.critic_opt.step = a.high.critic_opt.step = lambda: None  # keep the grads
        a.f_weight, a.recon_weight = 0.0, 0.0  # only the critics' gradients reach the encoder ...
        a.low.critic_loss = lambda *args: (torch.zeros((), requires_grad=True), {"q_mean": torch.zeros(())})
        a.update(0)  # ... and of those only the manager's
        grads[w] = (a.goal_encoder.trunk.parameters().__next__().grad.clone(),
                    next(a.high.critic.parameters()).grad.clone())
    assert grads[1.0][0].abs().sum() > 0
    assert torch.allclose(grads[0.25][0], 0.25 * grads[1.0][0], rtol=1e-3, atol=1e-8)
    assert torch.allclose(grads[0.25][1], grads[1.0][1], rtol=1e-4, atol=1e-7)


def test_success_is_impossible_at_a_windows_first_step():
    agent, env = build_agent("agent.k=5", "agent.high.adapt_scale=false", "agent.high.goal_scale=0.01")
    obs = env.reset(seed=0)[0]
    for episode in range(20):  # windows closed by an episode end right after their first step
        agent.begin_episode(True)
        action = agent.act(obs, explore=True)
        agent.observe(obs, action, 0.0, obs, True, False)  # the worker has not moved yet
    stats = agent.env_stats
    assert max(stats["goal/start_distance"]) < 0.05  # the old absolute threshold 0.05 called all of these reached
    assert stats["goal/relative_success"] == [0.0] * 20
    assert np.allclose(stats["goal/progress"], 0.0, atol=1e-7)
    assert stats["goal/closer"] == [0.0] * 20  # not moving is not getting closer
    # a window that ends on its goal succeeds and shows its progress
    agent.begin_episode(True)
    agent.act(obs, explore=True)
    goal = torch.as_tensor(agent.state[True]["goal"])
    monkey = agent.target_goals
    agent.target_goals = lambda o: (None, goal.unsqueeze(0))
    agent.observe(obs, np.zeros(1, np.float32), 0.0, obs, True, False)
    agent.target_goals = monkey
    assert stats["goal/relative_success"][-1] == 1.0 and stats["goal/progress"][-1] > 0
    assert stats["goal/relative_success_mirror"][-1] == 0.0  # chance control: the mirrored goal was not reached
    assert stats["goal/progress_mirror"][-1] < 0 < stats["goal/progress"][-1]  # moved toward g, away from its mirror
    assert stats["goal/closer"][-1] == 1.0 and stats["goal/closer_mirror"][-1] == 0.0
    # a window that ends on the goal mirrored through its start counts for the chance level only
    agent.begin_episode(True)
    agent.act(obs, explore=True)
    s = agent.state[True]
    mirror = (2 * torch.as_tensor(s["start_latent"]) - torch.as_tensor(s["goal"])).clamp(-1, 1)
    agent.target_goals = lambda o: (None, mirror.unsqueeze(0))
    agent.observe(obs, np.zeros(1, np.float32), 0.0, obs, True, False)
    agent.target_goals = monkey
    assert stats["goal/relative_success"][-1] == 0.0 and stats["goal/relative_success_mirror"][-1] == 1.0
    assert stats["goal/progress"][-1] < 0 < stats["goal/progress_mirror"][-1]
    assert stats["goal/closer"][-1] == 0.0 and stats["goal/closer_mirror"][-1] == 1.0


def test_goal_scale_follows_the_measured_k_step_motion():
    agent, env = build_agent("agent.k=4", "agent.high.scale_rate=0.5", "agent.high.scale_motion_mult=2.0")
    assert agent.goal_scale == agent.init_goal_scale  # before any measurement
    collect(agent, env, 80)
    hb = agent.sample_high()
    full = hb["steps"] == agent.k
    start, end = agent.target_goals(hb["obs"][full])[1], agent.target_goals(hb["next_obs"][full])[1]
    motion = (end - start).pow(2).mean().sqrt()
    assert torch.allclose(agent.k_step_motion, motion)  # first measurement, bias-corrected
    assert torch.allclose(torch.as_tensor(agent.goal_scale), 2.0 * motion)
    u = torch.ones(1, agent.goal_dim)
    assert torch.allclose(agent.goal_from_action(torch.zeros(1, agent.goal_dim), u), (2.0 * motion).clamp(max=1.0))
    assert {"motion.sum", "motion.weight"} <= agent.state_dict().keys()  # checkpointed with the networks


def test_median_motion_ignores_rare_huge_windows():
    """high.motion_stat=median: one window moving 100x the others (CarRacing's episode-start zoom)
    sets the rms estimate but not the median one, which stays at the typical window's motion."""
    start = torch.zeros(25, 8)
    end = torch.full((25, 8), 0.01)
    end[0] = 1.0  # one zoom window per 25
    for stat, expected in (("rms", ((24 * 0.01 ** 2 + 1.0) / 25) ** 0.5), ("median", 0.01)):
        agent, _ = build_agent(f"agent.high.motion_stat={stat}", "agent.goal_dim=8")
        agent.record_motion(start, end)
        assert float(agent.k_step_motion) == pytest.approx(expected, rel=1e-4), stat
    assert expected * 10 < ((24 * 0.01 ** 2 + 1.0) / 25) ** 0.5  # the two differ by more than 10x


def test_recent_motion_is_the_median_of_the_last_collected_windows_not_of_replay():
    """high.motion_source=recent: the k-step motion is measured on the last motion_windows training
    windows as collected (EMA latent at the window's start and end), so the goal reach follows a policy
    that speeds up; sampling replay leaves it alone, and it is checkpointed with the networks."""
    agent, env = build_agent("agent.k=4", "agent.high.motion_source=recent", "agent.high.motion_windows=3",
                             "agent.high.motion_stat=median", "agent.high.scale_motion_mult=2.0")
    assert agent.goal_scale == agent.init_goal_scale  # before any window closes
    obs = collect(agent, env, 80)[0]  # one episode: 20 full windows, starts at steps 0, 4, ..., 76
    z = agent.target_goals(torch.as_tensor(np.stack(obs)))[1]
    msq = torch.stack([(z[t + 4] - z[t]).pow(2).mean() for t in range(0, 80, 4)])
    expected = msq[-3:].median().sqrt()  # the last 3 windows only
    assert not torch.allclose(expected, msq.median().sqrt())  # ...which differs from all 20 windows'
    assert torch.allclose(agent.k_step_motion, expected)
    assert torch.allclose(torch.as_tensor(agent.goal_scale), 2.0 * expected)
    assert np.allclose(agent.env_stats["goal/window_motion"], msq.sqrt().numpy(), rtol=1e-5)
    agent.sample_high()  # replayed windows do not move the estimate
    assert torch.allclose(agent.k_step_motion, expected)
    fresh, _ = build_agent("agent.k=4", "agent.high.motion_source=recent", "agent.high.motion_windows=3",
                           "agent.high.motion_stat=median")
    fresh.load_state_dict(agent.state_dict())
    assert torch.allclose(fresh.k_step_motion, expected) and {"motion.msq", "motion.count"} <= agent.state_dict().keys()


def test_iqr_goal_spread_keeps_typical_goal_rewards_at_unit_scale_under_a_heavy_tail():
    """low.goal_spread=iqr: 2% of goal distances 300x the rest (CarRacing's zoom windows) set the std,
    which shrinks typical normalised goal rewards far below the env reward's unit scale; the
    interquartile spread keeps them near 1 and the tail is clipped at goal_clip."""
    torch.manual_seed(0)
    goal_r = -torch.rand(500) * 0.002  # typical distances, uniform in [0, 0.002]
    goal_r[:10] = -0.3
    env_r = torch.randn(500)
    scaled = {}
    for spread in ("std", "iqr"):
        agent, _ = build_agent(f"agent.low.goal_spread={spread}", "agent.low.goal_clip=10",
                               "agent.low.extrinsic_weight=0")
        scaled[spread] = agent.worker_reward(goal_r, env_r)
    typical = slice(10, None)
    assert scaled["std"][typical].std() < 0.05  # the tail's std drowns the typical rewards
    assert 0.5 < scaled["iqr"][typical].std() < 2.0
    assert torch.allclose(scaled["iqr"][:10], torch.full((10,), -10.0))  # clipped tail
    assert scaled["std"][:10].min() > -10  # std: no clipping


def test_offset_goal_input_is_the_goal_minus_the_states_ema_latent_in_goal_scale_units():
    """low.goal_input=offset: the worker reads (g - E_ema(s)) / goal_scale, the manager's action u at
    a window's start; acting and training feed it the same input for the same (s, g)."""
    agent, env = build_agent("agent.low.goal_input=offset", "agent.high.scale_rate=0.5")
    collect(agent, env, 60)
    agent.update(60)  # measures the k-step motion: goal_scale is no longer the initial one
    obs = env.reset(seed=3)[0]
    agent.begin_episode(False)
    seen = []
    real_act = agent.low.act
    agent.low.act = lambda x, explore: (seen.append(x.clone()), real_act(x, explore))[1]
    agent.act(obs, explore=False)
    s = agent.state[False]
    h, _ = agent.goal_encoder(agent.obs_tensor(obs))
    z = agent.target_goals(agent.obs_tensor(obs))[1]
    goal = torch.as_tensor(s["goal"]).unsqueeze(0)
    offset = seen[-1][0, h.shape[-1]:]
    assert torch.allclose(offset, ((goal - z) / agent.goal_scale)[0], atol=1e-5)
    u = torch.as_tensor(s["action"])  # the manager's action of this window
    if bool(((z + agent.goal_scale * u).abs() < 1).all()):  # no clipping: the offset is u itself
        assert torch.allclose(offset, u.reshape(-1), atol=1e-4)
    assert torch.allclose(seen[-1], agent.worker_input(h, goal, z))  # the same function trains the critic
    absolute, _ = build_agent()
    assert torch.equal(absolute.worker_input(h, goal, None), torch.cat([h, goal], -1))
    with pytest.raises(BAD_CONFIG, match="goal_input=offset"):
        build_agent("agent.low.goal_input=offset", "agent.planning.method=graph", env="pointmaze")


def test_f_multistep_loss_uses_the_real_actions_and_stops_at_episode_ends():
    agent, env = build_agent("agent.k=4", "env.max_episode_steps=6", "agent.model.rollout_batch=64")
    collect(agent, env, 20)  # episodes of 6 steps: many 4-step rollouts cross an episode end
    rb = agent.replay
    idx = np.flatnonzero(rb.valid[:rb.size])
    seen = []
    real_f = agent.f.forward
    agent.f.forward = lambda g, h, a: (seen.append(a.clone()), real_f(g, h, a))[1]

    def loss(ix=idx):
        seen.clear()
        h, g = agent.goal_encoder(torch.as_tensor(rb.obs[ix]))
        h_next, g_next = agent.target_goals(torch.as_tensor(rb.obs[(ix + 1) % rb.capacity]))
        return agent.f_rollout_loss(ix, h, g, h_next, g_next)[0]

    loss()
    assert len(seen) == agent.k  # one call per step
    slots, mask = agent.sequence_slots(idx, agent.k)
    step_in_episode = idx - np.array([np.flatnonzero(rb.episode[:rb.size] == e)[0] for e in rb.episode[idx]])
    ep_len = np.array([(rb.valid[:rb.size] & (rb.episode[:rb.size] == e)).sum() for e in rb.episode[idx]])  # 6, or 2 running
    remaining = np.minimum(ep_len - step_in_episode, agent.k)  # transitions left in the episode (max k)
    assert np.array_equal(mask.sum(1), remaining) and (np.diff(mask, axis=1) <= 0).all()
    for j, actions in enumerate(seen):
        rows = mask[:, j] > 0
        assert torch.equal(actions[rows], torch.as_tensor(rb.action[idx[rows] + j]))  # the real actions
    # rollouts from the first episode: what the later episodes hold does not change their loss
    first = idx[rb.episode[idx] == 0]
    before = loss(first)
    later = np.flatnonzero(rb.episode[:rb.size] > 0)
    saved = rb.action.copy(), rb.obs.copy()
    rb.action[later] += 5.0
    rb.obs[later] += 3.0
    assert torch.allclose(loss(first), before)
    rb.action[:], rb.obs[:] = saved
    # and it matches the masked mean over (row, step) of f's own multi-step predictions
    agent.f.forward = real_f
    with torch.no_grad():
        h, g = agent.goal_encoder(torch.as_tensor(rb.obs[idx]))
        total, count = 0.0, 0.0
        for j in range(agent.k):
            g, h = agent.f(g, h, torch.as_tensor(rb.action[slots[:, j]]))
            ht, gt = agent.target_goals(torch.as_tensor(rb.obs[(slots[:, j] + 1) % rb.capacity]))
            err = (g - gt).pow(2).mean(-1) + (h - ht).pow(2).mean(-1)
            total, count = total + (err * torch.as_tensor(mask[:, j])).sum(), count + mask[:, j].sum()
    assert torch.allclose(loss(), total / count, rtol=1e-5)


def test_inverse_dynamics_is_off_by_default_and_builds_nothing():
    agent, env = build_agent()
    assert agent.inverse is None and not any(key.startswith("inverse.") for key in agent.state_dict())
    collect(agent, env, 60)
    metrics = agent.update(0)
    assert "loss/inverse" not in metrics and "goal/inverse_r2" not in metrics
    agent, _ = build_agent("agent.model.inverse_weight=0.5")  # on: checkpointed, trained by model_opt
    assert {"inverse.0.weight", "inverse.2.weight"} <= agent.state_dict().keys()
    trained = {id(p) for group in agent.model_opt.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in agent.inverse.parameters())
    with pytest.raises(BAD_CONFIG, match="inverse_weight"):
        build_agent("agent.model.inverse_weight=-1")


def test_inverse_loss_predicts_the_stored_action_from_online_goals_of_both_observations():
    agent, env = build_agent("agent.model.inverse_weight=1.0", "env.max_episode_steps=30")
    collect(agent, env, 70)  # transitions at episode ends too: their next observation is the final one
    rb, seen = agent.replay, {}
    real_sample = agent.sample_low

    def sample_low():  # the goals the update should feed the head, by the encoder before the update steps it
        b = real_sample()
        with torch.no_grad():
            seen["g"] = agent.goal_encoder(rb.obs_at(b["idx"], "cpu"))[1]
            seen["g_next"] = agent.goal_encoder(rb.obs_at(rb.next_idx(b["idx"]), "cpu"))[1]
        seen["action"] = torch.as_tensor(rb.action[b["idx"]])
        return b

    agent.sample_low = sample_low
    agent.inverse.register_forward_hook(lambda module, args, out: seen.update(x=args[0].detach(), pred=out.detach()))
    metrics = agent.update(0)
    assert torch.allclose(seen["x"], torch.cat([seen["g"], seen["g_next"]], -1), atol=1e-6)
    assert torch.allclose(metrics["loss/inverse"], F.mse_loss(seen["pred"], seen["action"]), rtol=1e-5)
    action_var = seen["action"].var(0, unbiased=False).mean()
    assert torch.allclose(metrics["goal/inverse_r2"], 1 - metrics["loss/inverse"] / action_var)
    # its gradient reaches the goal head through g_t, and the goal head and the trunk through g_{t+1}
    obs, next_obs = rb.obs_at(np.arange(32), "cpu"), rb.obs_at(rb.next_idx(np.arange(32)), "cpu")
    g = agent.goal_encoder(obs)[1]
    g.retain_grad()
    agent.inverse_loss(g, next_obs, torch.as_tensor(rb.action[:32]))[0].backward()
    assert g.grad.abs().sum() > 0
    agent.goal_encoder.zero_grad()
    agent.inverse_loss(g.detach(), next_obs, torch.as_tensor(rb.action[:32]))[0].backward()
    assert agent.goal_encoder.head[0].weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in agent.goal_encoder.trunk.parameters())


def test_inverse_loss_enters_the_encoder_signal_times_its_weight():
    grads = {}
    for w in (1.0, 0.25):
        torch.manual_seed(0)  # same networks, same samples
        a, e = build_agent(f"agent.model.inverse_weight={w}")
        collect(a, e, 60)
        a.model_opt.step = a.low.critic_opt.step = a.high.critic_opt.step = lambda: None  # keep the grads
        # only the inverse loss reaches the encoder
        a.f_weight, a.recon_weight, a.high_trains_encoder = 0.0, 0.0, False
        a.low.critic_loss = lambda *args: (torch.zeros((), requires_grad=True), {"q_mean": torch.zeros(())})
        a.update(0)
        grads[w] = (a.goal_encoder.head[0].weight.grad.clone(), a.inverse[0].weight.grad.clone())
    assert grads[1.0][0].abs().sum() > 0
    assert torch.allclose(grads[0.25][0], 0.25 * grads[1.0][0], rtol=1e-4, atol=1e-9)
    assert torch.allclose(grads[0.25][1], 0.25 * grads[1.0][1], rtol=1e-4, atol=1e-9)


def test_inverse_dynamics_learns_pendulum_actions():
    """Pendulum's torque shows in its velocity change, so (g_t, g_t+1) come to predict a_t: the batch
    r2 of random actions rises from about 0 in 400 updates (seed 0: 0.06 -> 0.45, seed 1: -0.05 ->
    0.17, means of the first and last 50; at the default lr 3e-4 it climbs about 3x slower)."""
    torch.manual_seed(0)
    agent, env = build_agent("agent.model.inverse_weight=1.0", "agent.model.lr=1e-3", "agent.planning.candidates=0")
    collect(agent, env, 400)
    r2 = [float(agent.update(step)["goal/inverse_r2"]) for step in range(400)]
    first, last = np.mean(r2[:50]), np.mean(r2[-50:])
    assert last > 0.1 and last > first + 0.1, (first, last)


def test_planning_scores_are_raw_q_minus_priced_miss(monkeypatch):
    agent, env = build_agent("agent.planning.candidates=5", "agent.planning.q_weight=2.0",
                             "agent.planning.dist_weight=3.0")
    obs = agent.obs_tensor(env.reset(seed=0)[0])
    h, g = agent.goal_encoder(obs)
    dist = torch.tensor([0.5, 0.1, 0.2, 0.3, 0.4])
    # raw: 2*0.1 - 3*0.2 = -0.4 loses to 2*0 - 3*0.1 = -0.3; z-scored, the small Q gap would become ~2 std and win
    q = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0])
    monkeypatch.setattr(agent, "plan_distances", lambda *a: dist)
    monkeypatch.setattr(agent.high.critic, "forward", lambda hs, a: q.expand(2, -1))
    seen = {}
    real = agent.goal_from_action
    monkeypatch.setattr(agent, "goal_from_action", lambda s, u: (seen.setdefault("u", u.clone()), real(s, u))[1])
    with torch.no_grad():
        u, _ = agent.choose_goal(h, g, agent.target_goals(obs)[1], explore=True)
    assert torch.equal(u[0], seen["u"][1])


def test_planning_picks_the_candidate_f_predicts_most_reachable(monkeypatch):
    agent, env = build_agent("agent.planning.candidates=6", "agent.planning.q_weight=0")
    obs = agent.obs_tensor(env.reset(seed=0)[0])
    h, g = agent.goal_encoder(obs)
    seen = {}
    real = agent.plan_distances

    def spy(h_, g_, candidates):
        seen["candidates"], seen["dist"] = candidates.clone(), real(h_, g_, candidates)
        return seen["dist"]

    monkeypatch.setattr(agent, "plan_distances", spy)
    with torch.no_grad():
        _, chosen = agent.choose_goal(h, g, agent.target_goals(obs)[1], explore=True)
    best = int(seen["dist"].argmin())
    assert torch.equal(chosen[0], seen["candidates"][best])
    # and the distances are f's k-step latent rollout under the deterministic low-level policy
    cand = seen["candidates"]
    hh, gg = h.expand(len(cand), -1), g.expand(len(cand), -1)
    with torch.no_grad():
        for _ in range(agent.k):
            a = agent.low.actor(torch.cat([hh, cand], -1), deterministic=True)[0]
            gg, hh = agent.f(gg, hh, a)
    assert torch.allclose(seen["dist"], (gg - cand).pow(2).mean(-1))
    assert agent.env_stats["goal/plan_gain"][0] >= 0


def test_evaluation_does_not_disturb_the_training_window():
    agent, env = build_agent()
    collect(agent, env, 15)
    before = ({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in agent.state[True].items()},
              dict(agent.pending))
    agent.begin_episode(explore=False)
    obs = make_env(compose_cfg(["env=pendulum"]).env).reset(seed=1)[0]
    for _ in range(25):
        agent.act(obs, explore=False)
    assert np.array_equal(agent.state[True]["goal"], before[0]["goal"]) and agent.state[True]["t"] == before[0]["t"]
    assert agent.pending["steps"] == before[1]["steps"]


def test_eval_windows_are_scored_from_their_start_and_end_ema_latents_and_emitted_once():
    """Evaluation windows get the training windows' metrics, measured on the deterministic policy: start
    distance from the EMA latent at the window's first step, end distance from the EMA latent of the
    observation that opens the next window; eval_metrics() emits them once and training stats stay apart."""
    agent, env = build_agent("agent.k=5")
    collect(agent, env, 120)
    agent.update(120)  # empties the training stats
    agent.begin_episode(explore=False)
    obs, observations, goals = env.reset(seed=3)[0], [], []
    for _ in range(11):  # two full windows; the 11th act opens the third, closing the second
        observations.append(obs)
        obs = env.step(agent.act(obs, explore=False))[0]
        goals.append(torch.as_tensor(agent.state[False]["goal"]))
    assert agent.env_stats == {}  # evaluation windows never enter the training metrics
    metrics = agent.eval_metrics()
    assert metrics["eval/goal_windows"] == 2.0 and agent.eval_metrics() == {}
    z = [agent.target_goals(agent.obs_tensor(o))[1][0] for o in (observations[0], observations[5], observations[10])]
    start = [float(agent.window_stats(z[0], goals[0], z[0], 0.0)["window_distance"]),
             float(agent.window_stats(z[1], goals[5], z[1], 0.0)["window_distance"])]
    end = [float(agent.window_stats(z[0], goals[0], z[1], 0.0)["window_distance"]),
           float(agent.window_stats(z[1], goals[5], z[2], 0.0)["window_distance"])]
    assert not torch.equal(goals[0], goals[5])
    assert metrics["eval/goal_start_distance"] == pytest.approx(np.mean(start), rel=1e-5)
    assert metrics["eval/goal_window_distance"] == pytest.approx(np.mean(end), rel=1e-5)
    assert metrics["eval/goal_progress"] == pytest.approx(np.mean(start) - np.mean(end), rel=1e-4, abs=1e-8)
    assert metrics["eval/goal_progress_after_first"] == pytest.approx(start[1] - end[1], rel=1e-4, abs=1e-8)


def test_window_stats_score_reaching_the_goal_staying_put_and_the_mirror():
    agent, _ = build_agent()
    start, goal = torch.zeros(agent.goal_dim), torch.full((agent.goal_dim,), 0.1)
    start_dist = float(((goal - start) ** 2).mean())
    reached = agent.window_stats(start, goal, goal, start_dist)
    assert reached["relative_success"] == 1.0 and reached["closer"] == 1.0
    assert reached["progress"] == pytest.approx(start_dist)
    assert reached["progress_mirror"] == pytest.approx(-3 * start_dist)  # ended 2x as far from the mirror goal
    assert reached["relative_success_mirror"] == 0.0 and reached["closer_mirror"] == 0.0
    still = agent.window_stats(start, goal, start, start_dist)  # never moved: no progress, no success
    assert still["progress"] == 0.0 and still["closer"] == 0.0 and still["relative_success"] == 0.0


def test_cem_planning_searches_beyond_the_actors_proposals(monkeypatch):
    """On a score whose optimum lies far from the actor's mean, CEM's later rounds find goals that
    re-ranking the actor's own samples (method=sample, as many candidates in all) cannot, and CEM
    never scores below the actor's mean."""
    agent, env = build_agent("agent.planning.candidates=16", "agent.planning.q_weight=0",
                             "agent.planning.method=cem", "agent.planning.iterations=4", "agent.planning.elites=4")
    obs = agent.obs_tensor(env.reset(seed=0)[0])
    h, g = agent.goal_encoder(obs)
    g_target = agent.target_goals(obs)[1]
    target = agent.goal_from_action(g_target, torch.full((1, agent.goal_dim), 0.9))
    monkeypatch.setattr(agent, "plan_distances", lambda h_, g_, cand: (cand - target).pow(2).mean(-1))
    miss = {}
    for method, candidates in (("cem", 16), ("sample", 64)):
        agent.plan_method, agent.n_candidates = method, candidates
        torch.manual_seed(0)
        with torch.no_grad():
            _, chosen = agent.choose_goal(h, g, g_target, explore=True)
        miss[method] = float((chosen - target).pow(2).mean())
    with torch.no_grad():
        mean_goal = agent.goal_from_action(g_target, agent.high.act(h, explore=False))
    assert miss["cem"] <= float((mean_goal - target).pow(2).mean())
    assert miss["cem"] < 0.75 * miss["sample"], miss
    assert agent.env_stats["goal/plan_gain"][0] > 0


def test_planning_method_is_validated():
    with pytest.raises(BAD_CONFIG, match="agent.planning.method"):
        build_agent("agent.planning.method=beam")
    with pytest.raises(BAD_CONFIG, match="agent.planning.elites"):
        build_agent("agent.planning.method=cem", "agent.planning.candidates=4", "agent.planning.elites=5")


@pytest.mark.parametrize("method", ["sample", "cem"])
def test_eval_with_planning_is_identical_across_calls_with_the_same_seed(method):
    from latentrl.trainer import run_episode
    agent, env = build_agent("agent.planning.candidates=6", "env.max_episode_steps=40",
                             f"agent.planning.method={method}")
    collect(agent, env, 30)
    eval_env = make_env(compose_cfg(["env=pendulum", "env.max_episode_steps=40"]).env)
    results = []
    for global_seed in (1, 2):  # the training run's RNG state must not matter
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        goals = []
        act = agent.act
        agent.act = lambda o, explore: (act(o, explore), goals.append(agent.state[False]["goal"]))[0]
        results.append((run_episode(agent, eval_env, seed=7), np.array(goals)))
        del agent.act
        assert torch.equal(torch.get_rng_state(), before)  # evaluation draws nothing from the global stream
    (ret_a, goals_a), (ret_b, goals_b) = results
    assert ret_a == ret_b and np.array_equal(goals_a, goals_b)


def test_checkpoint_rng_state_has_cuda_streams():
    from latentrl import checkpoint as ckpt_io
    state = ckpt_io.rng_state()
    assert "cuda" in state
    if not torch.cuda.is_available():
        assert state["cuda"] == []  # structure on CPU: one state per CUDA device, none here
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    state = ckpt_io.rng_state()
    torch.rand(5)
    ckpt_io.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
    ckpt_io.set_rng_state({k: v for k, v in state.items() if k != "cuda"})  # checkpoints from before CUDA state


# ----------------------------------------------------------------------------- runs
def _metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.parametrize("reward", ["distance", "direction", "contrastive"])
def test_smoke_pendulum(tmp_path, reward):
    ret = train_run(["agent=goal_hrl", "env=pendulum", *FAST, f"agent.reward={reward}", *TINY,
                     "trainer.total_steps=160", "trainer.warmup_steps=60", "trainer.log_every=40"], tmp_path)
    assert np.isfinite(ret)
    keys = set().union(*_metrics(tmp_path))
    for key in ["goal/window_distance", "goal/relative_success", "goal/progress", "goal/scale", "goal/f_error", "goal/plan_gain", "loss/low_critic",
                "loss/high_critic", "loss/goal_f", "loss/recon", "train/low_alpha", "train/high_alpha",
                "eval/goal_progress", "eval/goal_relative_success_mirror", "eval/goal_windows"]:
        assert key in keys, key


def test_smoke_carracing_pixels(tmp_path):
    ret = train_run(["agent=goal_hrl", "env=carracing", "env.resize=32", "env.action_repeat=4", *FAST,
                     "agent.decoder.batch_size=8", "trainer.total_steps=80", "trainer.warmup_steps=50",
                     "trainer.eval_every=0", "trainer.eval_episodes=1", "env.max_episode_steps=120",
                     "trainer.checkpoint_every=0", "trainer.log_every=20", "trainer.progress=false"], tmp_path)
    assert np.isfinite(ret)
    assert "goal/f_error" in set().union(*_metrics(tmp_path))


def test_pixel_reconstruction_image():
    agent, env = build_agent("env.resize=32", "env.frame_stack=2", "env.grayscale=true", env="carracing")
    collect(agent, env, 20)
    agent.update(0)
    img = agent.images()["goal/reconstruction"]
    assert img.shape == (1, 32, 64) and img.dtype == np.uint8


def _same_extra(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_extra(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("extra", [[], ["agent.model.inverse_weight=1.0"],
                                   ["agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0",
                                    "agent.low.goal_weight_from=80", "agent.low.goal_weight_ramp=50",
                                    "agent.low.goal_encoder_weight=0.1"],
                                   ["agent.low.own_encoder=true", "agent.planning.candidates=0",
                                    "agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0"],
                                   ["agent.low.split_critics=true", "agent.low.extrinsic_weight=1.0",
                                    "agent.low.goal_phase_return=-1e9", "agent.low.goal_phase_episodes=1",
                                    "agent.low.goal_weight_ramp=50", "agent.high.motion_source=recent",
                                    "agent.high.motion_windows=5"]],
                         ids=["default", "inverse", "split_critics", "own_encoder", "goal_phase_recent_motion"])
def test_resume_is_exact(tmp_path, extra):
    exact = ["agent=goal_hrl", "env=pendulum", *FAST, "agent.k=7", "trainer.warmup_steps=60", "trainer.eval_every=0",
             "trainer.eval_episodes=1", "trainer.log_every=50", "trainer.checkpoint_every=0", "trainer.progress=false",
             *extra]
    train_run([*exact, "trainer.total_steps=220"], tmp_path / "straight")  # crosses the 200-step episode end
    train_run([*exact, "trainer.total_steps=110"], tmp_path / "split")  # mid-episode, mid-window (110 % 7 != 0)
    train_run([f"resume={tmp_path / 'split'}", "trainer.total_steps=220"], tmp_path / "unused")
    load = lambda d, f: torch.load(d / "checkpoints" / f, weights_only=True)  # noqa: E731
    a, b = load(tmp_path / "straight", "last.pt")["agent"], load(tmp_path / "split", "last.pt")["agent"]
    assert a["modules"].keys() == b["modules"].keys()
    assert ("inverse.0.weight" in a["modules"]) == ("inverse" in str(extra))  # the inverse head is checkpointed when on
    assert ("goal_critic_target.q.net.0.weight" in a["modules"]) == ("split" in str(extra))
    assert any(k.startswith("worker_encoder.") for k in a["modules"]) == ("own_encoder" in str(extra))
    assert ("motion.msq" in a["modules"]) == ("recent" in str(extra))  # the recent windows' motion resumes too
    for key in a["modules"]:
        assert torch.equal(a["modules"][key], b["modules"][key]), key
    assert _same_extra(a["extra"], b["extra"]) and a["extra"]["state"]["goal"] is not None
    if "goal_phase" in str(extra):  # opened by the update after the first episode ends (step 200), past the split
        assert a["extra"]["goal_phase"]["from"] == 200 and a["modules"]["low.actor.mix"] > 0
    assert _same_extra(a["optimizers"], b["optimizers"])
    assert _same_extra(load(tmp_path / "straight", "buffers.pt"), load(tmp_path / "split", "buffers.pt"))


# ----------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_learns_pendulum(tmp_path):
    """Eval return >= -600 (random: about -1200) and the worker reaches its goals well above chance
    (chance: the same windows scored against their goals mirrored through the start latent). The
    same run in the issue-9 ablation sweep (experiment=goal_hrl_pendulum threads=1, seed 0) ended at
    -184; its windows' relative success averaged 0.43 over the run (peak 0.98 at 2k steps) against a
    mirror rate of 0.00; it needs ~3.5 CPU-minutes."""
    ret = train_run(["agent=goal_hrl", "env=pendulum", "experiment=goal_hrl_pendulum", "trainer.eval_every=0",
                     "trainer.checkpoint_every=0", "trainer.progress=false", "threads=1"], tmp_path)
    assert ret >= -600, ret
    rows = [m for m in _metrics(tmp_path) if "goal/relative_success" in m]
    success = np.mean([m["goal/relative_success"] for m in rows])
    chance = np.mean([m["goal/relative_success_mirror"] for m in rows])
    assert success > chance + 0.15, (success, chance)
    assert np.mean([m["goal/progress"] for m in rows]) > 0


# ----------------------------------------------------------------------------- scripts/goal_probe.py
def test_goal_probe_reads_goal_sensitivity_and_a_heavy_tailed_motion():
    """The probe's goal sensitivity is 0 for a worker blind to its goal (goal columns of its first
    layer zeroed) and > 0 otherwise; the real k-step motion is reported by position in the episode."""
    from test_evaluate_plot import load_script

    goal_probe = load_script("goal_probe")
    agent, env = build_agent("agent.low.goal_input=offset", "env.max_episode_steps=50")
    collect(agent, env, 200)
    agent.update(200)
    seeing = goal_probe.probe(agent, n_states=32, n_goals=8)
    assert seeing["goal_sensitivity"] > 1e-3
    first = agent.low.actor.net[0]
    with torch.no_grad():
        first.weight[:, -agent.goal_dim:] = 0.0  # the worker's input ends with the goal offset
    blind = goal_probe.probe(agent, n_states=32, n_goals=8)
    assert blind["goal_sensitivity"] < 1e-9
    spans = blind["replay_k_step_msq_by_position"]
    assert sum(v["n"] for v in spans.values()) == blind["states"] and "windows 0-0" in spans
    assert blind["goal_distance_batch"]["p99"] >= blind["goal_distance_batch"]["median"]


def test_goal_probe_step_stats_show_aim_and_the_distance_rewards_tax_on_large_aimless_steps():
    from test_evaluate_plot import load_script

    goal_probe = load_script("goal_probe")
    torch.manual_seed(0)
    n = 4000
    z, goal = torch.zeros(n, 8), 0.1 * torch.randn(n, 8)
    size = torch.where(torch.arange(n) < n // 2, 0.01, 1.0).unsqueeze(-1)  # half tiny, half large steps
    aimless = goal_probe.step_stats(z, z + size * torch.randn(n, 8), goal, env_reward=size.squeeze(-1))
    assert abs(aimless["cos_to_goal"]) < 0.05
    assert aimless["progress_large_steps"] < -0.5 < aimless["progress_small_steps"]  # moving is taxed
    assert aimless["msq_paid_over_median"] > 100  # the env pays the large steps
    aimed = goal_probe.step_stats(z, z + 0.5 * goal, goal, env_reward=torch.zeros(n))
    assert aimed["cos_to_goal"] == pytest.approx(1.0, abs=1e-4) and aimed["progress_large_steps"] > 0


def test_goal_probe_cli_writes_json_and_refuses_other_agents(tmp_path, capsys):
    from test_evaluate_plot import load_script

    goal_probe = load_script("goal_probe")
    base = [*TINY, "env=pendulum", "threads=1", "trainer.total_steps=250"]
    train_run([*base, "agent=goal_hrl", *FAST], tmp_path / "g")
    assert goal_probe.main([str(tmp_path / "g"), "--states", "16", "--goals", "4"]) == 0
    result = json.loads((tmp_path / "g" / "goal_probe.json").read_text())
    assert result["states"] == 16 and len(result["action_var_across_goals"]) == 1
    assert -1.0 <= result["worker_steps"]["cos_to_goal"] <= 1.0
    train_run([*base, "agent=sac"], tmp_path / "s")
    assert goal_probe.main([str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "agent=goal_hrl" in err[0]


def test_evaluate_script_reproduces_the_trainers_eval_goal_metrics(tmp_path, capsys):
    """scripts/evaluate.py on a goal_hrl checkpoint plays the trainer's final evaluation episodes and so
    reports the same eval/goal_ window metrics as the run logged (results.json), and prints them."""
    from test_evaluate_plot import load_script

    evaluate = load_script("evaluate")
    train_run([*TINY, "env=pendulum", "threads=1", "trainer.total_steps=250", "agent=goal_hrl", *FAST], tmp_path)
    logged = {k: v for k, v in json.loads((tmp_path / "results.json").read_text()).items() if k.startswith("eval/goal_")}
    assert logged["eval/goal_windows"] == 19.0  # a 200-step episode, k=10: its last window is not seen closing
    assert evaluate.main([str(tmp_path), "--episodes", "1", "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())["agent_metrics"]
    assert report == pytest.approx(logged, rel=1e-6)
    assert "eval/goal_progress:" in capsys.readouterr().out
