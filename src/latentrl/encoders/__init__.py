"""Observation -> feature encoders, interchangeable across agents.

Every encoder is an nn.Module built as `Encoder(obs_space=...)` with an `out_dim` attribute and
`forward(obs) -> (batch, out_dim)`; pixel encoders take uint8 channels-first batches and scale
them themselves."""

from latentrl.encoders.cnn import CNNEncoder
from latentrl.encoders.mlp import IdentityEncoder, MLPEncoder

__all__ = ["CNNEncoder", "MLPEncoder", "IdentityEncoder"]
