"""Every test runs with the engine's debug checks on (block ids used by attention are validated)."""

import os

os.environ["GEMMA4_DEBUG_CHECKS"] = "1"  # set at import: engines started in subprocesses inherit it
