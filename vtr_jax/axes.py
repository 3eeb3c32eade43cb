"""Logical axis names, once, for parameters and activations (MaxText's `common_types.py`).

Every parameter is created with names from here (`vtr_jax.models.common.param_axes`)
and activations are constrained by them at the model's seams; `vtr_jax.sharding`
maps names to mesh axes with rules from the config. This module imports nothing
of the project: it is the bottom of the layering (see `tests/test_layering.py`).
"""

# Parameters.
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
NORM = "norm"
POSITIONS = "positions"
PATCH = "patch"  # conv kernel height / width
CHANNELS = "channels"

# Activations (used by `nn.with_logical_constraint`-style constraints, `vtr_jax.sharding.constrain`).
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_VOCAB = "activation_vocab"

PARAMETER_AXES = (EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, NORM, POSITIONS, PATCH, CHANNELS)
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_VOCAB)
