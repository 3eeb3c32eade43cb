"""Exceptions shared across vtr_jax."""


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match the model."""
