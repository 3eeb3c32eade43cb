"""Exceptions shared across vtr_jax, and how the entry points report them."""

from __future__ import annotations

import contextlib
import sys


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match the model."""


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


@contextlib.contextmanager
def user_errors(program: str, *more: type[BaseException]):
  """Inside an entry point: an error the user can act on (a ValueError or a missing file, which is what every
  check in vtr_jax raises, and the `more` types) ends the program with one line on stderr and exit status 2,
  not a traceback."""
  try:
    yield
  except USER_ERRORS + more as e:
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    # Abandoned async work (orbax's pending reads of the corrupt step) would otherwise print "Exception
    # ignored in <coroutine ...>" blocks after this line while the interpreter shuts down.
    sys.unraisablehook = lambda unraisable: None
    sys.exit(2)
