"""Replay buffer: one stored frame per transition, correct next observations across episode ends,
termination vs truncation, wrap-around, hindsight sampling, checkpoint round trip."""

import numpy as np
import torch

from latentrl.buffers import ReplayBuffer


def fill(buf, episodes):
    """episodes: list of (length, terminated_at_end). obs value = global counter, so next_obs == obs + 1."""
    t = 0
    for length, term in episodes:
        for i in range(length):
            last = i == length - 1
            buf.add(np.full(2, t, np.float32), np.array([t], np.float32), float(t), np.full(2, t + 1, np.float32),
                    terminated=last and term, truncated=last and not term)
            t += 1
        t += 1  # the final observation of an episode is never a transition start
    return t


def test_next_obs_and_episode_ends():
    buf = ReplayBuffer(100, (2,), np.float32, 1, seed=0)
    fill(buf, [(5, True), (4, False), (3, True)])
    assert len(buf) == 12  # transitions, not slots
    b = buf.gather(buf.sample_idx(500))
    np.testing.assert_array_equal(b["next_obs"][:, 0].numpy(), b["obs"][:, 0].numpy() + 1)
    np.testing.assert_array_equal(b["action"][:, 0].numpy(), b["obs"][:, 0].numpy())
    # terminated only on the last step of terminated episodes; truncation never stops bootstrapping
    term_obs = set(b["obs"][b["terminated"] == 1][:, 0].int().tolist())
    assert term_obs == {4, 13}  # episodes 1 and 3 end on obs 4 and 13; episode 2 (truncated at 9) bootstraps


def test_pixels_stored_once_per_transition():
    buf = ReplayBuffer(1000, (3, 8, 8), np.uint8, 2)
    per = buf.bytes_per_transition()
    assert 3 * 8 * 8 <= per < 2 * 3 * 8 * 8  # one frame, not obs + next_obs


def test_wraparound_keeps_pairs_consistent():
    buf = ReplayBuffer(17, (2,), np.float32, 1, seed=1)
    fill(buf, [(7, True)] * 10)  # 80 slots through a 17-slot ring
    b = buf.gather(buf.sample_idx(1000))
    np.testing.assert_array_equal(b["next_obs"][:, 0].numpy(), b["obs"][:, 0].numpy() + 1)


def test_future_goals_come_from_same_episode_later_steps():
    buf = ReplayBuffer(200, (2,), np.float32, 1, seed=2)
    fill(buf, [(10, True), (6, False), (8, True)])
    idx = buf.sample_idx(2000)
    fut = buf.sample_future(idx)
    assert (buf.episode[fut] == buf.episode[idx]).all()
    assert (buf.obs[fut, 0] > buf.obs[idx, 0]).all()
    # the final observation of an episode is reachable as a goal
    assert (~buf.valid[fut]).any()


def test_state_dict_roundtrip_continues_identically():
    a = ReplayBuffer(50, (2,), np.float32, 1, seed=3)
    fill(a, [(9, True), (5, False)])
    state = a.state_dict()
    b = ReplayBuffer(50, (2,), np.float32, 1, seed=99)
    b.load_state_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()})
    np.testing.assert_array_equal(a.sample_idx(64), b.sample_idx(64))
    assert len(a) == len(b)
