"""Data: the bundled synthetic VQA benchmark, VQA dataset loading and batching, tokenizers.

`scenes` generates the benchmark's examples; `vqa` stores and loads datasets
(the benchmark and Hub-style local data) and turns rows into model batches.
Import them as submodules (`from vtr_jax.data import vqa`): they pull in
`datasets`, which `import vtr_jax` should not pay for.
"""

from vtr_jax.data.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
