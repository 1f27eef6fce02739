"""One JAX persistent compilation cache for the whole test session, shared by every xdist worker and every process a
test starts (training runs, sweeps, kill-and-resume).

Why: most tests train tiny models whose steps compile in 1-5 s, and many tests compile the very same step (same model,
same flags) in a fresh process. Measured on 2 cores: tests/test_train.py + tests/test_ladder.py took 218 s without the
cache and 127 s with a cold one. A cached executable is the one XLA compiled for the same key (HLO, flags, device), so
no test's result depends on it.

The controller creates the directory before xdist starts its workers (they inherit the environment) and removes it at
the end; a cache directory the user already set is used as is and kept.
"""

import os
import shutil
import tempfile

_OWNED = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWNED = tempfile.mkdtemp(prefix="scaling-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWNED
    # JAX caches only compiles over 1 s by default; the tiny models' steps are often faster than that.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _OWNED and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(_OWNED, ignore_errors=True)
