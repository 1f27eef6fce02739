"""The project's per-machine cache root: `$SCALING_CACHE`, default ~/.cache/scaling. It holds the token caches
(scaling.data.tokens), the measured CPU peak (scaling.accounting), XLA's compilation cache (scaling.train.compile_cache)
and Hugging Face task data (scaling.eval.tasks); one definition, so one variable moves all of them. No imports from
the project: every module may use it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

DEFAULT_CACHE_ROOT = "~/.cache/scaling"


def cache_root(environ: Optional[Mapping[str, str]] = None) -> Path:
    """$SCALING_CACHE (unset or empty: ~/.cache/scaling), user-expanded."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("SCALING_CACHE") or DEFAULT_CACHE_ROOT).expanduser()
