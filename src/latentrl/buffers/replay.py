"""Preallocated circular replay storage.

Each observation is stored once: slot i holds obs_i, and when `valid[i]` it also holds the
transition i -> i+1 (action, reward, terminated), whose next observation is obs at slot i+1.
At an episode end the final observation takes a slot of its own that is not a transition start,
so pixel replay costs one frame per transition, not two. `terminated` stops bootstrapping;
a time-limit truncation only ends the episode. Dict observations (goal-conditioned envs) are
stored the same way, one array per key.

Episode bookkeeping (episode id, last slot of each episode) supports hindsight relabeling:
`sample_future(idx)` draws a later slot of the same episode (HER's "future" strategy).

With `streams` > 1 (vector envs, one stream per sub-env) the slots are split into equal segments,
one circular buffer per stream, so each sub-env's episodes stay contiguous while the sub-envs'
transitions arrive interleaved; every "next slot" wraps within its own segment (`advance`).
Sampling is uniform over the transitions of all segments. One stream is the plain buffer.

On CUDA, sampled batches go to the device through pinned memory without blocking the host.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from latentrl.config import ConfigError
from latentrl.envs.goal import map_obs


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A sampled array as a tensor on `device`. To CUDA it is copied from pinned memory with
    non_blocking=True, so the host goes on (sampling, the next update's Python) while it travels;
    on the CPU the tensor shares the array's memory, as before."""
    if torch.device(device).type == "cuda":
        return torch.from_numpy(np.ascontiguousarray(array)).pin_memory().to(device, non_blocking=True)
    return torch.as_tensor(array, device=device)


class ReplayBuffer:
    def __init__(self, capacity: int, obs_shape: tuple | dict, obs_dtype, action_dim: int, seed: int = 0,
                 extras: Mapping[str, tuple] | None = None, streams: int = 1):
        """obs_shape, obs_dtype: of one observation, or {key: shape}, {key: dtype} for dict observations
        (latentrl.envs.goal.obs_layout gives either from a space).
        extras: name -> (shape, dtype) of per-transition fields an agent stores beside the core ones.
        streams: sub-envs writing to this buffer (env.num_envs), each into its own segment of slots."""
        if capacity < 2:
            raise ValueError(f"replay capacity must be >= 2, got {capacity}")
        self.capacity, self.streams = int(capacity), int(streams)
        self.segment = self.capacity // self.streams  # slots of each stream; the remainder stays unused
        if self.segment < 2:
            raise ConfigError(f"a replay of {capacity} slots leaves fewer than 2 to each of env.num_envs={streams} "
                              "sub-envs: raise agent.buffer_size or lower env.num_envs")
        layout = ({k: (tuple(v), np.dtype(obs_dtype[k])) for k, v in obs_shape.items()} if isinstance(obs_shape, dict)
                  else {None: (tuple(obs_shape), np.dtype(obs_dtype))})
        try:
            arrays = {k: np.zeros((capacity, *shape), dtype=dt) for k, (shape, dt) in layout.items()}
        except MemoryError:
            need = capacity * sum(int(np.prod(shape)) * dt.itemsize for shape, dt in layout.values()) / 2**30
            raise ConfigError(f"a replay of {capacity} observations of shape {obs_shape} needs {need:.1f} GiB, "
                              "more than this machine can allocate: lower agent.buffer_size") from None
        self.obs = arrays if isinstance(obs_shape, dict) else arrays[None]  # an array, or a dict of arrays
        self.action = np.zeros((capacity, action_dim), dtype=np.float32)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=bool)
        self.valid = np.zeros(capacity, dtype=bool)
        self.episode = np.full(capacity, -1, dtype=np.int64)
        self.episode_last = np.full(capacity, -1, dtype=np.int64)  # last slot of the slot's episode, -1 while running
        self.extras = {k: np.zeros((capacity, *shape), dtype=dt) for k, (shape, dt) in (extras or {}).items()}
        self.rng = np.random.default_rng(seed)
        self.size = 0  # slots written so far (<= capacity): one past the highest slot written
        self.num_transitions = 0  # transitions ever added
        self.episode_id = 0  # id the next episode gets
        # per stream:
        self.ptrs = np.arange(self.streams, dtype=np.int64) * self.segment  # slot where its next transition starts
        self.open = np.zeros(self.streams, dtype=bool)  # whether obs at its ptr is its running episode's current obs
        self.first = self.ptrs.copy()  # first slot of its running episode
        self.running = np.zeros(self.streams, dtype=np.int64)  # id of its running episode
        self.fill = np.zeros(self.streams, dtype=np.int64)  # slots written in its segment

    @property
    def ptr(self) -> int:
        """Where the next transition starts (single-stream buffers: goal_hrl and tests read it)."""
        if self.streams != 1:
            raise AttributeError("a multi-stream replay has one ptr per stream: use ptrs[stream]")
        return int(self.ptrs[0])

    def advance(self, slots, steps=1):
        """The slot `steps` places after `slots` in the same stream's segment (circular); with one
        stream, (slots + steps) % capacity."""
        start = slots - slots % self.segment
        return start + (slots - start + steps) % self.segment

    # ---------------------------------------------------------------- writing
    def _obs_arrays(self) -> dict:
        return self.obs if isinstance(self.obs, dict) else {"obs": self.obs}

    def bytes_per_transition(self) -> int:
        per_slot = sum(a[0].nbytes for a in self._obs_arrays().values()) + self.action[0].nbytes + 4 + 1 + 1 + 8 + 8
        return per_slot + sum(a[0].nbytes for a in self.extras.values())

    def _write_obs(self, slot: int, obs, stream: int) -> None:
        if isinstance(self.obs, dict):
            for k, arr in self.obs.items():
                arr[slot] = obs[k]
        else:
            self.obs[slot] = obs
        self.valid[slot] = False
        self.episode[slot] = self.running[stream]
        self.episode_last[slot] = -1
        self.size = max(self.size, slot + 1)
        self.fill[stream] = max(self.fill[stream], slot - stream * self.segment + 1)

    def add(self, obs, action, reward, next_obs, terminated: bool, truncated: bool, stream: int = 0,
            **extras) -> int:
        """Store one transition of sub-env `stream`; returns its slot."""
        if not self.open[stream]:
            self.running[stream] = self.episode_id
            self.episode_id += 1
            self._write_obs(self.ptrs[stream], obs, stream)
            self.open[stream] = True
            self.first[stream] = self.ptrs[stream]
        slot = int(self.ptrs[stream])
        self.action[slot] = action
        self.reward[slot] = reward
        self.terminated[slot] = terminated
        for k, v in extras.items():
            self.extras[k][slot] = v
        self.valid[slot] = True
        self.num_transitions += 1
        nxt = self.advance(slot)
        self._write_obs(nxt, next_obs, stream)
        self.ptrs[stream] = nxt
        if terminated or truncated:
            self._close_episode(nxt, stream)
        return slot

    def _close_episode(self, last: int, stream: int) -> None:
        first = self.first[stream]
        n = (last - first) % self.segment + 1
        self.episode_last[self.advance(first, np.arange(n))] = last
        self.open[stream] = False
        self.ptrs[stream] = self.advance(last)  # the final observation keeps its own slot

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return int(self.valid.sum())

    def sample_idx(self, n: int) -> np.ndarray:
        """Uniform over stored transitions (rejection over the few non-transition slots)."""
        if not self.valid[: self.size].any():
            raise RuntimeError("replay buffer holds no transitions yet: raise trainer.warmup_steps")
        idx = self._written_slot(self.rng.integers(0, self.fill.sum(), n))
        bad = ~self.valid[idx]
        while bad.any():
            idx[bad] = self._written_slot(self.rng.integers(0, self.fill.sum(), int(bad.sum())))
            bad = ~self.valid[idx]
        return idx

    def _written_slot(self, k: np.ndarray) -> np.ndarray:
        """The k-th written slot, counting through the streams' segments in order."""
        if self.streams == 1:
            return k
        ends = np.cumsum(self.fill)
        stream = np.searchsorted(ends, k, side="right")
        return stream * self.segment + k - (ends[stream] - self.fill[stream])

    def obs_at(self, slots: np.ndarray, device: torch.device | str | None = None):
        """Observations at `slots`, shaped like what was stored (an array or a dict of arrays);
        tensors on `device` when one is given."""
        if device is None:
            return map_obs(lambda a: a[slots], self.obs)
        return map_obs(lambda a: to_device(a[slots], device), self.obs)

    def next_idx(self, idx: np.ndarray) -> np.ndarray:
        return self.advance(idx)

    def sample_future(self, idx: np.ndarray) -> np.ndarray:
        """For each transition slot, a uniformly drawn later observation slot of the same episode
        (from its next observation up to the episode's last)."""
        last = np.where(self.episode_last[idx] >= 0, self.episode_last[idx], self.ptrs[idx // self.segment])
        span = (last - idx) % self.segment  # >= 1 for a transition slot
        offset = (self.rng.random(len(idx)) * span).astype(np.int64) + 1
        return self.advance(idx, np.minimum(offset, span))

    def sequence_slots(self, idx: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots of `horizon` consecutive transitions starting at each `idx`, and their mask.

        -> slots (n, horizon + 1): observation slots s_t .. s_{t+horizon} (transition j is slots[:, j]);
           mask (n, horizon) float: 1 while transition t+j is a real transition of the same episode.
        The mask is cumulative: it drops to 0 after an episode's last transition (termination or
        truncation: the final observation has its own slot that is not a transition) and at slots a
        newer episode overwrote, and stays 0. Slots past a masked step are clamped to the last valid
        observation, so every gathered observation is a real one."""
        steps = np.arange(horizon + 1)
        raw = self.advance(idx[:, None], steps[None, :])
        same = self.valid[raw[:, :horizon]] & (self.episode[raw[:, :horizon]] == self.episode[idx][:, None])
        mask = np.cumprod(same, axis=1).astype(np.float32)
        # observation j+1 exists whenever transition j is valid (its next obs); beyond, repeat the last one
        reach = mask.sum(1).astype(np.int64)  # number of valid transitions; obs 0..reach are real
        slots = self.advance(idx[:, None], np.minimum(steps[None, :], reach[:, None]))
        return slots, mask

    def sample_sequences(self, n: int, horizon: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """n windows of `horizon` transitions from uniformly drawn start transitions (for multi-step
        model losses and n-step returns): obs (n, H+1, ...), action (n, H, A), reward / terminated /
        mask (n, H), and extras at the start transition."""
        idx = self.sample_idx(n)
        slots, mask = self.sequence_slots(idx, horizon)
        t = lambda a: to_device(a, device)  # noqa: E731
        trans = slots[:, :horizon]
        batch = {
            "obs": self.obs_at(slots, device),
            "action": t(self.action[trans]),
            "reward": t(self.reward[trans] * mask),
            "terminated": t(self.terminated[trans].astype(np.float32) * mask),
            "mask": t(mask),
            "idx": idx,
        }
        for k, v in self.extras.items():
            batch[k] = t(v[idx])
        return batch

    def sample(self, n: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        idx = self.sample_idx(n)
        return self.gather(idx, device)

    def gather(self, idx: np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        nxt = self.next_idx(idx)
        t = lambda a: to_device(a, device)  # noqa: E731
        batch = {
            "obs": self.obs_at(idx, device),
            "action": t(self.action[idx]),
            "reward": t(self.reward[idx]),
            "next_obs": self.obs_at(nxt, device),
            "terminated": t(self.terminated[idx].astype(np.float32)),
            "idx": idx,
        }
        for k, v in self.extras.items():
            batch[k] = t(v[idx])
        return batch

    # ---------------------------------------------------------------- checkpointing
    _ARRAYS = ("action", "reward", "terminated", "valid", "episode", "episode_last")  # and obs (an array or a dict)
    _SCALARS = ("size", "num_transitions", "episode_id")
    _PER_STREAM = ("ptrs", "open", "first", "running", "fill")

    def state_dict(self) -> dict:
        n = self.size
        state = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)[:n])) for k in self._ARRAYS}
        state["obs"] = map_obs(lambda a: torch.from_numpy(np.ascontiguousarray(a[:n])), self.obs)
        state["extras"] = {k: torch.from_numpy(np.ascontiguousarray(v[:n])) for k, v in self.extras.items()}
        state.update({k: getattr(self, k) for k in self._SCALARS})
        state.update({k: torch.from_numpy(getattr(self, k).copy()) for k in self._PER_STREAM})
        state["rng"] = self.rng.bit_generator.state
        state["capacity"], state["streams"] = self.capacity, self.streams
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"checkpointed buffer has capacity {state['capacity']}, config says {self.capacity}")
        if state.get("streams", 1) != self.streams:
            raise ValueError(f"checkpointed buffer has {state.get('streams', 1)} streams, config says {self.streams}")
        n = state["size"]
        saved_obs = state["obs"] if isinstance(state["obs"], dict) else {"obs": state["obs"]}
        if saved_obs.keys() != self._obs_arrays().keys():
            raise ValueError(f"checkpointed buffer observations have keys {sorted(saved_obs)}, expected "
                             f"{sorted(self._obs_arrays())}")
        fields = [(k, saved_obs[k], dst) for k, dst in self._obs_arrays().items()]
        fields += [(k, state[k], getattr(self, k)) for k in self._ARRAYS]
        for k, src, dst in fields:
            src = src.numpy()
            if src.shape[1:] != dst.shape[1:]:
                raise ValueError(f"checkpointed buffer field '{k}' has shape {src.shape[1:]}, expected {dst.shape[1:]}")
            dst[:n] = src
        for k, v in state["extras"].items():
            self.extras[k][:n] = v.numpy()
        for k in self._SCALARS:
            setattr(self, k, state[k])
        if "ptrs" not in state:  # written before streams: one stream, and episode_id counted closed episodes
            state = {**state, "ptrs": [state["ptr"]], "open": [state["episode_open"]],
                     "first": [state["episode_first"]], "running": [state["episode_id"]], "fill": [n]}
            self.episode_id += int(state["episode_open"])
        for k in self._PER_STREAM:
            getattr(self, k)[:] = np.asarray(state[k])
        self.rng.bit_generator.state = state["rng"]
