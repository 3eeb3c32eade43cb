"""The layering of DESIGN.md, checked on the source: imports point down only, models and reduce meet only in
`vtr_jax.seams`, and every module imports on its own (no import cycle)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom up; a module may import its own layer or lower ones. Prefixes name packages (longest match wins).
LAYERS = (
    ("axis names, errors", ("vtr_jax.axes", "vtr_jax.errors")),
    ("seam types, sharding", ("vtr_jax.seams", "vtr_jax.sharding")),
    ("kernels, image processing", ("vtr_jax.kernels", "vtr_jax.processors")),
    ("reduction API", ("vtr_jax.reduce.api", "vtr_jax.reduce.primitives")),
    ("models", ("vtr_jax.models",)),
    ("reduction methods", ("vtr_jax.reduce",)),
    ("VLM assembly", ("vtr_jax.models.vlm",)),
    ("flops, data, conversion", ("vtr_jax.flops", "vtr_jax.data", "vtr_jax.convert", "vtr_jax.supervision",
                                 "vtr_jax.chat")),
    ("placement, evaluation, training, tools", ("vtr_jax.placement", "vtr_jax.evaluation", "vtr_jax.training",
                                                "vtr_jax.stream", "vtr_jax.metrics", "vtr_jax.tasks", "vtr_jax.lmms",
                                                "vtr_jax.search", "vtr_jax.demo")),
    ("the package", ("vtr_jax",)),
)


def modules() -> dict[str, str]:
  """Every module of the package: dotted name -> file (kernels/ is installed as vtr_jax.kernels)."""
  out = {}
  for top, package in (("vtr_jax", "vtr_jax"), ("kernels", "vtr_jax.kernels")):
    for directory, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(directory, f), os.path.join(ROOT, top))[:-3].replace(os.sep, ".")
          name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
          out[name] = os.path.join(directory, f)
  return out


def layer(name: str) -> int:
  best, rank = -1, None
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if (name == p or name.startswith(p + ".")) and len(p) > best:
        best, rank = len(p), i
  assert rank is not None, f"{name} is in no layer: add it to LAYERS in tests/test_layering.py"
  return rank


def imports(path: str, name: str) -> list[str]:
  """vtr_jax modules imported anywhere in the file (module level and inside functions)."""
  tree = ast.parse(open(path).read())
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names if a.name.split(".")[0] == "vtr_jax"]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      if base.split(".")[0] == "vtr_jax":
        known = modules()
        out += [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
  return out


def test_imports_point_down_only():
  found = modules()
  wrong = []
  for name, path in sorted(found.items()):
    for target in imports(path, name):
      if target.startswith(name + "."):  # a package importing its own modules (the registry's method import)
        continue
      if layer(target) > layer(name):
        wrong.append(f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
  assert not wrong, "imports that point up:\n  " + "\n  ".join(wrong)


def test_models_and_reduce_meet_only_in_the_seams():
  wrong = []
  for name, path in sorted(modules().items()):
    targets = imports(path, name)
    if name.startswith("vtr_jax.models.") and name != "vtr_jax.models.vlm":
      wrong += [f"{name} imports {t}" for t in targets if t.startswith("vtr_jax.reduce")]
    if name.startswith("vtr_jax.reduce"):
      wrong += [f"{name} imports {t}" for t in targets if t.startswith("vtr_jax.models")]
    if name.startswith("vtr_jax.kernels"):
      wrong += [f"{name} imports {t}" for t in targets if layer(t) > layer("vtr_jax.sharding")
                and not t.startswith("vtr_jax.kernels")]
  assert not wrong, "\n".join(wrong)


def test_the_axis_names_import_nothing_of_the_project():
  assert imports(modules()["vtr_jax.axes"], "vtr_jax.axes") == []


# Modules whose optional extra may be absent: they may fail to import only for that reason.
OPTIONAL = {"vtr_jax.lmms": "lmms_eval"}


def test_every_module_imports_on_its_own():
  """Each module imported first in a fresh module table (one process, the package forgotten between): an import
  cycle shows up as the ImportError of the module that starts it."""
  names = sorted(modules())
  code = f"""
import importlib, sys
failed = []
for name in {names!r}:
  for key in [k for k in sys.modules if k == "vtr_jax" or k.startswith("vtr_jax.")]:
    del sys.modules[key]
  try:
    importlib.import_module(name)
  except ModuleNotFoundError as e:
    if {OPTIONAL!r}.get(name) != e.name:
      failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
  except Exception as e:
    failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
print(f"imported {{len({names!r}) - len(failed)}} of {{len({names!r})}} modules on their own")
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  print(lines[-1])
  assert lines[-1] == f"imported {len(names)} of {len(names)} modules on their own", "\n".join(lines)
