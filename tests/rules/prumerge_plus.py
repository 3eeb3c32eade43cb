"""prumerge_plus: PruMerge's outliers plus spatially uniform patches, merged alike, then the summary token."""

from __future__ import annotations

from rules import rule
from rules._prumerge import *  # noqa: F401,F403

KEEP_ALL = None
NO_KEEP_ALL = "every kept token is merged with its key neighbours, and a summary token is added"
EXAMPLES = ("prumerge_plus:keep=4,neighbours=4",)
ERRORS = [("prumerge_plus:keep=17", "keep=17 is larger than the 16 tokens")]


@rule(("prumerge_plus:keep=8,neighbours=3", 11, 8, 3, True),
      ("prumerge_plus:keep=3,neighbours=5", 0, 3, 5, True),  # the stride uses the capped count
      ("prumerge_plus:keep=2,neighbours=4", 15, 2, 4, True))  # one outlier: stride 5 reaches P - 1, excluded
def matches_numpy(spec, seed, cap, neighbours, plus):
  check_prumerge(spec, seed, cap, neighbours, plus)
