"""device=cuda: every agent trains, evaluates, checkpoints and resumes exactly on the GPU, keeps all
of its state there, and its update never waits for the device. Skipped where CUDA is absent (the
CPU suite covers the same paths on device=cpu)."""

import pytest
import torch

from conftest import TINY, compose_cfg
from test_resume import EXACT, straight_and_resumed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
CUDA = [f"device={DEVICE}", *EXACT]
AGENTS = {  # every agent, small enough for seconds per run
    "sac": ["env=pendulum", "agent=sac"],
    "sac_pixels": ["env=carracing", "env.resize=32", "env.action_repeat=2", "agent=sac", "agent.batch_size=16"],
    "sac_vector": ["env=pendulum", "agent=sac", "env.num_envs=2"],
    "latent_mbrl_svg": ["env=pendulum", "agent=latent_mbrl", "agent.policy_learning=svg", "agent.decoder=true"],
    "latent_mbrl_mbpo": ["env=pendulum", "agent=latent_mbrl", "agent.policy_learning=mbpo", "agent.ensemble_size=2"],
    "goal_hrl": ["env=pendulum", "agent=goal_hrl", "agent.k=7"],  # the split (170) falls mid-window
}


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_resume_is_exact_on_cuda(tmp_path, name):
    """Straight run == run killed mid-episode and resumed, parameters and optimizer states bit for
    bit (CUDA RNG streams in the checkpoint, deterministic cuDNN)."""
    straight, split = straight_and_resumed(tmp_path, [*AGENTS[name], *CUDA], total=300, half=170)
    assert straight["eval/return_mean"] == split["eval/return_mean"] and split["step"] == 300


def _trainer(tmp_path, overrides):
    from latentrl.trainer import Trainer

    return Trainer(compose_cfg([*overrides, f"device={DEVICE}", *TINY]), tmp_path)


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_all_agent_state_lives_on_the_gpu(tmp_path, name):
    trainer = _trainer(tmp_path, AGENTS[name])
    trainer.train()
    agent = trainer.agent
    state = agent.checkpoint_state()
    off = [k for k, v in state["modules"].items() if v.device.type != DEVICE]
    for opt_name, opt in agent.optimizers.items():
        off += [f"{opt_name}.{k}" for s in opt.state.values() for k, v in s.items()
                if torch.is_tensor(v) and v.dim() > 0 and v.device.type != DEVICE]  # Adam's scalar step may stay on the CPU
    assert not off, f"on the CPU: {off}"


@pytest.mark.parametrize("name", ["sac", "sac_pixels", "latent_mbrl_svg", "latent_mbrl_mbpo"])
def test_update_never_syncs_with_the_host(tmp_path, name):
    """Replay batches arrive through pinned non-blocking copies and metrics stay device tensors:
    torch's sync debug mode raises on any synchronising call inside update()."""
    trainer = _trainer(tmp_path, AGENTS[name])
    trainer.train()  # fills the replay and compiles nothing: a plain warm update first
    trainer.agent.update(trainer.step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = trainer.agent.update(trainer.step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(v.device.type == DEVICE for v in metrics.values() if torch.is_tensor(v))


def test_compile_on_cuda_trains_and_resumes(tmp_path):
    straight, split = straight_and_resumed(tmp_path, [*AGENTS["sac"], "agent.compile=true", *CUDA], total=300, half=170)
    assert split["step"] == 300
