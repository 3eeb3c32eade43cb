"""vtr_jax: visual-token reduction for LLaVA-style vision-language models in JAX."""

from vtr_jax.convert import load, save
from vtr_jax.errors import CheckpointError
from vtr_jax.models.vlm import VLM, VLMConfig, generate

__version__ = "0.1.0"
__all__ = ["CheckpointError", "VLM", "VLMConfig", "generate", "load", "save"]
