"""Each registered method's NumPy rendering of its rule: one module per method, `rules/<name>.py`.

`tests/test_contracts.py` runs every registered method through the same checks;
what differs between methods lives in its rule module:

  @rule(case, case, ...) functions   the method against a plain, loop-based NumPy
                         rendering of its published rule (tie-aware), one call per case
                         (a case is one argument, or a tuple of arguments)
  KEEP_ALL               a config string that keeps every token, equal to the unreduced
                         model; None when the method has none, with NO_KEEP_ALL saying why
  ERRORS                 [(config string, regex)]: each raises ReductionError on the
                         contract model (`reduce_harness.tiny_model`) with a matching message
  EXAMPLES               (optional) config strings run through the generic checks besides
                         the method's own 25 % budget (`Method.for_budget`)
  MASKED                 (in-LLM methods with a `mask` variant) a config string whose
                         `,mask=true` twin must give the same results

A new method adds its module here; nothing else in the tests changes.
"""

from __future__ import annotations

import importlib
import inspect
import os
from types import ModuleType
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))


def rule(*cases) -> Callable:
  """Marks a function as a rule check, run once per case (no cases: once without arguments)."""
  def wrap(fn):
    fn.rule_cases = list(cases) or [()]
    return fn
  return wrap


def available() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("_"))


def load(name: str) -> ModuleType:
  """The rule module of method `name` (raises naming the file to add when there is none)."""
  if name not in available():
    raise AssertionError(f"method {name!r} is registered but has no NumPy rendering: add tests/rules/{name}.py "
                         "(see tests/rules/__init__.py)")
  return importlib.import_module(f"rules.{name}")


def cases(name: str) -> list[tuple[str, Callable, tuple]]:
  """(id, function, arguments) of every rule check of method `name`."""
  module = load(name)
  out = []
  for fn_name, fn in inspect.getmembers(module, inspect.isfunction):
    if fn.__module__ != module.__name__ or not hasattr(fn, "rule_cases"):
      continue
    for case in fn.rule_cases:
      args = case if isinstance(case, tuple) else (case,)
      label = "-".join(str(a) for a in args)
      out.append((f"{fn_name}[{label}]" if label else fn_name, fn, args))
  if not out:
    raise AssertionError(f"tests/rules/{name}.py defines no @rule check")
  return out
