from latentrl.buffers.replay import ReplayBuffer

__all__ = ["ReplayBuffer"]
