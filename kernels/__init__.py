"""Pallas kernels for token scoring, each beside its pure-jnp reference (imported as vtr_jax.kernels).

Public ops (dispatching kernel vs reference, see `ops.py`): `max_similarity`,
`topk_similarity`, `attention_mass`. Kernel modules: `similarity.py` (fused
similarity max/min + arg), `attention_mass.py` (flash-style attention mass),
their GPU forms `similarity_gpu.py` and `attention_mass_gpu.py` (Pallas'
Triton lowering: one program per block, looping inside the kernel),
`topk.py` (reference only, with the measurement that kept it so),
`common.py` (shared block checks and tile helpers).

Note: the package attribute `attention_mass` is the op below, which shadows
the submodule of the same name; import from the submodule explicitly
(`from vtr_jax.kernels.attention_mass import BlockSizes`).
"""

from vtr_jax.kernels.ops import attention_mass, max_similarity, topk_similarity

__all__ = ["attention_mass", "max_similarity", "topk_similarity"]
