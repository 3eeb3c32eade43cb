"""Video token reduction (issue 14): frame-structured Tokens; methods are still to come (not registered yet)."""
