"""latentrl: a config-driven experiment runner for latent-space reinforcement learning."""

from latentrl.config import register_resolvers

register_resolvers()

__version__ = "0.1.0"
