"""Every env x agent x encoder combination that should compose does; the wrong ones fail at
start-up with a message naming the override to use; every env runs end to end."""

import gymnasium as gym
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CONF, TINY, compose_cfg, train_run
from latentrl.config import ConfigError
from latentrl.envs import make_env

ENVS = sorted(p.stem for p in (CONF / "env").glob("*.yaml"))
AGENTS = sorted(p.stem for p in (CONF / "agent").glob("*.yaml"))
PIXEL_ENVS = {"carracing"}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
ABLATIONS = sorted(p.stem for p in (CONF / "ablation").glob("*.yaml"))


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("env", ENVS)
def test_env_agent_default_encoder_compose(env, agent):
    cfg = compose_cfg([f"env={env}", f"agent={agent}"])
    expected = "CNNEncoder" if env in PIXEL_ENVS else "MLPEncoder"
    assert cfg.encoder._target_.endswith(expected), "each env selects a fitting encoder"
    assert cfg.agent._target_.startswith("latentrl.agents.")


@pytest.mark.parametrize("encoder", ["mlp", "identity"])
@pytest.mark.parametrize("env", sorted(set(ENVS) - PIXEL_ENVS))
def test_vector_env_encoder_override_wins(env, encoder):
    cfg = compose_cfg([f"env={env}", f"encoder={encoder}"])
    assert cfg.encoder._target_.lower().endswith(f"{encoder}encoder")


@pytest.mark.parametrize("overrides,fix", [
    (["env=pendulum", "encoder=cnn"], "encoder=mlp"),
    (["env=carracing", "encoder=mlp"], "encoder=cnn"),
    (["env=carracing", "encoder=identity"], "encoder=cnn"),
])
def test_mismatched_encoder_names_the_fix(tmp_path, overrides, fix):
    with pytest.raises(ConfigError, match=fix):
        train_run(overrides + TINY, tmp_path)


def test_carracing_actions_rescaled_from_unit_box():
    env = make_env(compose_cfg(["env=carracing", "env.resize=48", "env.frame_stack=2", "env.grayscale=true"]).env)
    assert env.action_space.low.tolist() == [-1, -1, -1] and env.action_space.high.tolist() == [1, 1, 1]
    inner = env.unwrapped.action_space
    assert inner.low.tolist() == [-1, 0, 0]  # gas and brake live in [0, 1]
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2, 48, 48) and obs.dtype == np.uint8
    env.close()


def test_action_repeat_sums_rewards():
    cfg = compose_cfg(["env=pendulum", "env.action_repeat=3"])
    env, ref = make_env(cfg.env), gym.make("Pendulum-v1")
    env.reset(seed=5), ref.reset(seed=5)
    _, r, *_ = env.step(np.array([0.5], np.float32))
    total = sum(ref.step(np.array([1.0], np.float32))[1] for _ in range(3))  # 0.5 in [-1,1] = 1.0 in [-2,2]
    assert r == pytest.approx(total)


@pytest.mark.parametrize("env", ENVS)
def test_each_env_runs_end_to_end(tmp_path, env):
    extra = ["env.resize=32", "agent.batch_size=32"] if env in PIXEL_ENVS else []
    mean_return = train_run([f"env={env}", "agent=sac", *TINY, *extra], tmp_path)
    assert np.isfinite(mean_return)
    assert (tmp_path / "results.json").exists() and (tmp_path / "checkpoints" / "last.pt").exists()
    assert (tmp_path / "config.yaml").exists() and any((tmp_path / "tb").iterdir())


def _flat_keys(node, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in node.items():
        keys |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return keys


@pytest.mark.parametrize("overrides", [[f"experiment={e}"] for e in EXPERIMENTS]
                         + [["experiment=goal_hrl_carracing", f"+ablation={a}"] for a in ABLATIONS])
def test_experiment_presets_set_only_keys_their_agent_defines(overrides):
    """A key an experiment or ablation YAML sets under agent: merges in silently when misspelt (Hydra's
    struct check covers command-line overrides, and the agents read low/high/model as plain dicts), so a
    typo in a preset would run the defaults and report them as the preset. Each preset's agent keys must
    exist in its agent's own YAML."""
    cfg = compose_cfg(overrides)
    agent_yaml = {OmegaConf.load(p)._target_: p.stem for p in (CONF / "agent").glob("*.yaml")}[cfg.agent._target_]
    defined = _flat_keys(OmegaConf.to_container(compose_cfg([f"agent={agent_yaml}"]).agent))
    preset = _flat_keys(OmegaConf.to_container(cfg.agent))
    assert preset <= defined, f"{' '.join(overrides)} sets agent keys conf/agent/{agent_yaml}.yaml lacks: " \
                              f"{sorted(preset - defined)}"


SAC_WORKER = {"own_encoder": ("low", True), "track_critic_reads_goal": ("low", False),
              "goal_encoder_weight": ("low", 0.0), "normalize_rewards": ("low", "goal"), "candidates": ("planning", 0)}


def test_carracing_preset_is_the_sac_worker_and_shared_worker_gives_back_the_earlier_one():
    """Since 2026-12-04 experiment=goal_hrl_carracing sets the five keys of the worker that is sac until its gate
    (the README's runs were launched with them as overrides), and +ablation=shared_worker restores the agent's own
    defaults for exactly those five, i.e. the preset of 2026-12-03, so the README's earlier rows reproduce."""
    preset = compose_cfg(["experiment=goal_hrl_carracing"]).agent
    shared = compose_cfg(["experiment=goal_hrl_carracing", "+ablation=shared_worker"]).agent
    defaults = compose_cfg(["agent=goal_hrl"]).agent
    explicit = compose_cfg(["experiment=goal_hrl_carracing"]
                           + [f"agent.{group}.{key}={value}" for key, (group, value) in SAC_WORKER.items()]).agent
    assert OmegaConf.to_container(preset) == OmegaConf.to_container(explicit)
    for key, (group, value) in SAC_WORKER.items():
        assert preset[group][key] == value
        assert shared[group][key] == defaults[group][key] != value, key
    preset_rest, shared_rest = OmegaConf.to_container(preset), OmegaConf.to_container(shared)
    for key, (group, _) in SAC_WORKER.items():
        del preset_rest[group][key], shared_rest[group][key]
    assert preset_rest == shared_rest
