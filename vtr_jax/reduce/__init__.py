"""Visual-token reduction: the API, the shared primitives and every registered method.

    from vtr_jax import reduce
    plan = reduce.parse("visionzip:keep=128+fastv:layer=2,keep=64")
    logits, cache, aux = VLM(cfg).apply(params, pixels, tokens, valid, reduction=plan, method=VLM.prefill)

`reduce.registry()` lists the methods; `reduce.describe()` prints one line each.
"""

import importlib
import pkgutil

from vtr_jax.reduce.api import (Context, Method, Plan, ReductionError, parse, parse_method, register, registry,
                                resolve_budget, setting_for)
from vtr_jax.seams import LLMState, Tokens


def _import_methods() -> None:
  """Importing a method module registers its methods: import every module of pre_llm/ and in_llm/."""
  from vtr_jax.reduce import in_llm, pre_llm
  for package in (pre_llm, in_llm):
    for info in pkgutil.iter_modules(package.__path__):
      importlib.import_module(f"{package.__name__}.{info.name}")


_import_methods()


def describe() -> str:
  """One line per registered method: name, stages, positions policy, summary."""
  rows = [f"{name:<14} {'/'.join(cls.stages):<12} {cls.positions:<9} {cls.summary}"
          for name, cls in registry().items()]
  return "\n".join(rows)


__all__ = ["Context", "LLMState", "Method", "Plan", "ReductionError", "Tokens", "describe", "parse", "parse_method",
           "register", "registry", "resolve_budget", "setting_for"]
