"""Agents: each owns its learning (networks, optimizers, buffers, internal state); the trainer
only calls the interface in `base.Agent`."""
