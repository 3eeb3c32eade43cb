"""exit: before layer K every visual token (the class token too) leaves; text keeps its positions."""

from __future__ import annotations

from rules import rule
from rules._llm import run_recorded

KEEP_ALL = None
NO_KEEP_ALL = "its rule removes every visual token; the layer is its only setting"
MASKED = "exit:layer=2"
ERRORS = [("exit:layer=0", r"layer=0 must be in 1\.\.3"), ("exit:layer=9", r"layer=9 must be in 1\.\.3")]


@rule(1, 3)
def every_visual_token_leaves_at_layer_k(layer):
  aux, _, _ = run_recorded(f"exit:layer={layer}")
  for i in range(4):
    before = {k: aux[f"llm/rec_in/{layer}/{k}"][i] for k in ("visual", "valid", "positions", "patch")}
    after = {k: aux[f"llm/rec_out/{layer}/{k}"][i] for k in ("visual", "valid", "positions", "patch")}
    assert not (after["visual"] & after["valid"]).any()
    text = ~before["visual"]
    assert after["positions"].tolist() == before["positions"][text].tolist()  # text positions unchanged (gaps)
    assert after["patch"].tolist() == before["patch"][text].tolist()
    for l in range(layer):  # every layer before K sees all 16 visual tokens
      assert int((aux[f"llm/rec_out/{l}/visual"][i] & aux[f"llm/rec_out/{l}/valid"][i]).sum()) == 16
