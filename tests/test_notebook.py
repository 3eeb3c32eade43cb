"""notebooks/quickstart.ipynb runs top to bottom on CPU (nbclient), in its small setting."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
  monkeypatch.setenv("VTR_QUICKSTART_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # LLVM at -O0 roughly halves XLA:CPU compile time; numerics are unchanged.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "fastervlm" in text and "divprune" in text and "fastv" in text
  assert "patches" in text and "method" in text  # the keep summary and the evaluation table
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(images) == 2, f"expected the overlay and the accuracy plot, got {len(images)} images"
