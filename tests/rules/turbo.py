"""turbo: ToMe's matching ranked by information degree (similarity minus alpha x semantic value)."""

from __future__ import annotations

from rules import rule
from rules._tome import *  # noqa: F401,F403

KEEP_ALL = "turbo:keep=16"
ERRORS = [("turbo:keep=1", "keep=1 cannot be reached")]


@rule(*[(CLIP, 1, 14), (SIGLIP, 2, 10)])
def hook_matches_numpy(vision, layer, t):
  state = make_state(np.random.default_rng(10 + t), 2, t)
  turbo = check_hook("turbo:keep=5,alpha=4", vision, layer, state, alpha=4.0)
  tome = check_hook("tome:keep=5", vision, layer, state)
  assert turbo != tome, "the semantic term changed nothing here; the test would not catch its absence"


@rule("turbo:keep=6,alpha=3")
def tower_run_matches_numpy_merge(spec):
  check_tower_run(spec)
