"""Pallas kernels for token scoring, each beside its pure-jnp reference (imported as vtr_jax.kernels).

Public ops (dispatching kernel vs reference): `max_similarity`, `topk_similarity`, `attention_mass`.
"""

from vtr_jax.kernels.ops import attention_mass, max_similarity, topk_similarity

__all__ = ["attention_mass", "max_similarity", "topk_similarity"]
