"""An app whose import takes $EXPLORE_IMPORT_DELAY seconds (default 0) and fails when
$EXPLORE_IMPORT_FAIL is set, for tests/integration/test_explore_lifecycle.py. It serves
pf_explore_app's routes."""

from __future__ import annotations

import os
import sys
import time

from pf_explore_app import app, tcp_echo  # noqa: F401 - served from here

print(f"pf_explore_slow: importing (pid {os.getpid()}) at {time.time():.3f}", file=sys.stderr,
      flush=True)
time.sleep(float(os.environ.get("EXPLORE_IMPORT_DELAY", "0")))
if os.environ.get("EXPLORE_IMPORT_FAIL"):
    raise RuntimeError(f"pf_explore_slow: {os.environ['EXPLORE_IMPORT_FAIL']}")
