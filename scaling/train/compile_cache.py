"""JAX's persistent compilation cache for training processes (config key `compile_cache`).

Why: a sweep compiles the same step again and again in fresh processes (seed replicates, a ladder's branches of one
width, a relaunch after a kill), and on CPU a small model's compiles cost as much as its training: a 5-layer d32 run
of experiments/dense98 compiled its step in 3.8 s cold and 1.3 s from the cache, and the whole process took 46.3 s
against 37.4 s (the eval and init functions hit as well). A cached executable is the one XLA compiled for the same
key (HLO, compile options, device, jax version), so no result depends on it: the losses are bit-identical.

The default directory is per host CPU type (architecture and a hash of /proc/cpuinfo's feature flags) under the
project's cache (`SCALING_CACHE`, default ~/.cache/scaling): machines sharing a home directory (a cluster's NFS) keep
their own entries instead of overwriting each other's. XLA:CPU also checks an entry's machine features on load and
recompiles when they differ (openxla/xla#44565: on some Intel hosts that check rejects every entry, so the cache
never hits there; runs are unaffected but for the compile time and an error line per load).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Optional

import jax

from scaling.paths import cache_root

log = logging.getLogger(__name__)

AUTO = "auto"
MAX_BYTES = 2 << 30  # least recently used entries are evicted beyond this (jax_compilation_cache_max_size)


def host_key() -> str:
    """`<machine>-<8 hex>`: the CPU architecture and a hash of its feature flags (the model name off Linux)."""
    features = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / aarch64
                features = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine() or 'unknown'}-{hashlib.sha1(features.encode()).hexdigest()[:8]}"


def default_dir(environ: Optional[dict] = None) -> Path:
    environ = os.environ if environ is None else environ
    return cache_root(environ) / "xla" / host_key()


def configure_compile_cache(setting: Optional[str], environ: Optional[dict] = None) -> Optional[Path]:
    """Points JAX's persistent cache at `setting` ("auto": `default_dir()`; a path; None: off) unless the process
    already has one (JAX_COMPILATION_CACHE_DIR, or jax.config set by the caller, which wins). Returns the directory
    in use, or None."""
    already = jax.config.jax_compilation_cache_dir
    if already:
        return Path(already)
    if setting is None:
        return None
    path = default_dir(environ) if setting == AUTO else Path(setting).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a cache is an optimisation: never a reason to lose a run
        log.warning("compile_cache=%s: cannot create %s (%s); compiling without the persistent cache", setting, path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX's defaults skip compiles under 1 s; a small model's init, eval and step each compile in about that, and
    # together cost seconds per run.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: no limit
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
