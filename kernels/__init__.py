"""Pallas kernels for token scoring, each beside its pure-jnp reference (imported as vtr_jax.kernels)."""
