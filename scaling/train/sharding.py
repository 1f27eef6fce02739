"""Data-parallel and FSDP sharding over a 1-D `jax.sharding.Mesh`, and multi-host start-up.

One code path for 1 and many devices: the train state and the batches are always placed on a mesh with one axis,
"data". With one device every placement is trivial; with many, the batch is split along its batch dimension and
  - mode "dp":   params and optimizer state are replicated; XLA all-reduces the gradients.
  - mode "fsdp": every large param (and its Adam moments) is split along one dimension over the same axis
                 (ZeRO-3 / FSDP, Rajbhandari et al. 2020; Zhao et al. 2023). XLA's SPMD partitioner all-gathers the
                 weights where the forward/backward needs them and reduce-scatters the gradients, because the step
                 constrains the gradients and the new state to the params' sharding.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` from explicit coordinator flags, or from
SLURM's environment (what submitit's srun sets; JAX's own SlurmCluster reads it). Each process computes the same
global batch (the sampler is a pure function of (seed, step)) and places only the shards its devices own
(`jax.make_array_from_callback`), so no process needs the others' data.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MODES = ("dp", "fsdp")
AXIS = "data"
PyTree = Any


@dataclass
class ShardingConfig:
    mode: str = "dp"  # "dp": replicate params; "fsdp": shard params + optimizer state over the data axis
    n_devices: Optional[int] = None  # devices on the mesh; None: every device of every process
    fsdp_min_params: int = 4096  # FSDP leaves this small stay replicated (norm scales, biases): gathering costs more
    # CPU only: split this host into N XLA CPU devices (jax_num_cpu_devices), so the step runs data parallel over them.
    # Each device executes its share of the step on its own thread, where one device leaves XLA:CPU's batched
    # attention dots and small fusions on one core; on 2 cores, 2 devices with mode fsdp measured 1.13-1.25x tokens/s
    # at d64-d384 with batch 16 x 128-256 tokens, but 2.5x slower on tiny one-layer models at batch 4 x 64, where the
    # per-step overhead dominates (BENCHMARKS.md, session 8). None: JAX's default (one CPU device, or what XLA_FLAGS
    # says). No effect on GPU/TPU devices.
    cpu_devices: Optional[int] = None
    # Multi-host (jax.distributed). coordinator "host:port" + num_processes + process_id, or all null: then SLURM's
    # environment is used when present (SLURM_JOB_ID, SLURM_NTASKS, ...), else a single process.
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sharding.mode={self.mode!r} is unknown: use one of {MODES}.")
        if self.n_devices is not None and (not isinstance(self.n_devices, int) or self.n_devices <= 0):
            raise ValueError(f"sharding.n_devices={self.n_devices!r} is invalid: give a positive integer, or null for all.")
        if self.cpu_devices is not None and (isinstance(self.cpu_devices, bool) or not isinstance(self.cpu_devices, int)
                                             or self.cpu_devices <= 0):
            raise ValueError(f"sharding.cpu_devices={self.cpu_devices!r} is invalid: give a positive integer (e.g. the "
                             "number of cores), or null for JAX's default.")
        if not isinstance(self.fsdp_min_params, int) or self.fsdp_min_params < 0:
            raise ValueError(f"sharding.fsdp_min_params={self.fsdp_min_params!r} is invalid: give an integer >= 0.")
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise ValueError(
                f"sharding.coordinator={self.coordinator!r}, num_processes={self.num_processes!r}, "
                f"process_id={self.process_id!r}: give all three for a multi-host run, or none (SLURM / single host)."
            )
        if self.coordinator is not None and ":" not in self.coordinator:
            raise ValueError(f"sharding.coordinator={self.coordinator!r} is invalid: give host:port, e.g. 10.0.0.1:12345.")
        if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"sharding.process_id={self.process_id!r} is invalid: it must be in [0, num_processes={self.num_processes})."
            )


CORES_ENV = "SCALING_CORES_PER_JOB"  # set by hydra/launcher=joblib_cpu (configs/hydra/launcher/joblib_cpu.yaml)
_held_cores: list = []  # this process's core locks: open files whose flock lives as long as the process


_watching_parent: list[int] = []  # the launcher process a worker watches (set once per process)


def exit_with_parent(poll_s: float = 2.0) -> Optional[int]:
    """In a joblib launcher's worker (a loky process), exits this process when the sweep's main process dies: returns
    the pid watched, or None elsewhere (in-process launchers, submitit/SLURM jobs, plain runs).

    Why: a sweep killed with SIGKILL cannot stop its loky workers, which trained their current runs to the end,
    held their cores' locks (so a relaunch ran unpinned beside them) and wrote into directories the user may be
    deleting (BENCHMARKS.md, session 12). A worker is its launcher's child, so losing the launcher re-parents it:
    then it exits at once, as if killed with it. That is a kill -9 of the run, which a relaunch resumes from its
    last checkpoint bit for bit (tests/test_train.py); no record is half-written (records are written atomically).
    """
    import multiprocessing
    import sys
    import threading
    import time

    if _watching_parent:
        return _watching_parent[0]
    if not multiprocessing.current_process().name.startswith("LokyProcess"):
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"scaling: this sweep worker's launcher (pid {parent}) is gone; exiting (a relaunch resumes its "
                      "runs from their checkpoints)", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    _watching_parent.append(parent)
    return parent


def pin_cores(environ: Optional[dict] = None, lock_dir: Optional[Path] = None) -> Optional[list[int]]:
    """Pins this process to `SCALING_CORES_PER_JOB` cores no other pinned job holds, before JAX starts its backend;
    returns the cores, or None when unset, already pinned, too late, or no core is free (then it runs unpinned).

    Why: XLA:CPU runs each step's thunks on an intra-op pool sized by the cores the process may use, whatever
    intra_op_parallelism_threads says; two jobs on 2 cores then each keep 2 `tf_XLAEigen` threads busy, and the 4
    threads preempt each other (sys time 12-43% of a sweep's CPU, experiments/dense98). A process pinned to one core
    starts a one-thread pool. Cores are claimed with an flock per core under the temp dir, so loky's reused workers
    and concurrent sweeps on one machine never share a core; a worker keeps its core for the jobs it runs next.
    """
    environ = os.environ if environ is None else environ
    want = environ.get(CORES_ENV)
    if not want or _held_cores:
        return None
    if not want.isdigit() or int(want) < 1:
        raise ValueError(f"{CORES_ENV}={want!r} is invalid: give a positive number of cores per job, or unset it.")
    if not hasattr(os, "sched_setaffinity"):  # macOS: no affinity API; the OS schedules the threads
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():  # threads already started: pinning now would leave them where they are
        log.warning("%s=%s ignored: JAX's backend already started in this process", CORES_ENV, want)
        return None
    lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / f"scaling-cores-{os.getuid()}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    held = []
    for core in sorted(os.sched_getaffinity(0)):
        f = open(lock_dir / f"core{core}.lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        held.append((core, f))
        if len(held) == int(want):
            break
    if len(held) < int(want):
        for _, f in held:
            f.close()  # releases the flock
        log.warning("%s=%s: only %d of this machine's cores are free of other jobs (this sweep's or another sweep's; "
                    "a killed sweep's workers exit within seconds); running unpinned. Launch at most cores / %s jobs "
                    "at once (hydra.launcher.n_jobs)", CORES_ENV, want, len(held), want)
        return None
    cores = [c for c, _ in held]
    os.sched_setaffinity(0, cores)  # this thread; every thread JAX starts from here on inherits it
    _held_cores.extend(f for _, f in held)
    log.info("pinned to core(s) %s", cores)
    return cores


def configure_cpu_devices(cfg: ShardingConfig) -> None:
    """Sets jax_num_cpu_devices from `cfg.cpu_devices` before the CPU backend starts; an equal count is a no-op, so a
    sweep's jobs in one process (Hydra's basic launcher) may all ask for it."""
    n = cfg.cpu_devices
    if n is None or jax.config.jax_num_cpu_devices == n:
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise ValueError(
            f"sharding.cpu_devices={n}, but JAX's CPU backend has already started in this process with {have} "
            "device(s): set it in the run's config so it applies before anything uses JAX, keep one value for every "
            "job of a sweep launched in one process, or launch the jobs as separate processes "
            "(hydra/launcher=joblib_cpu)."
        )
    jax.config.update("jax_num_cpu_devices", n)


def initialize_distributed(cfg: ShardingConfig, environ: Optional[dict] = None) -> bool:
    """Joins the multi-host job if one is configured; returns True when jax.distributed was initialized.

    Must run before anything touches a JAX backend (jax.devices(), any array op).
    """
    environ = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    if cfg.coordinator is not None:
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    elif "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        # JAX's SlurmCluster derives coordinator (first node of SLURM_STEP_NODELIST, port from the job id),
        # process count and id from srun's environment, which is how submitit launches tasks.
        jax.distributed.initialize()
    else:
        return False
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def make_mesh(cfg: ShardingConfig) -> Mesh:
    devices = jax.devices()  # global: every process's devices, in the same order on every process
    n = cfg.n_devices or len(devices)
    if n > len(devices):
        raise ValueError(
            f"sharding.n_devices={n} exceeds the {len(devices)} devices available: lower it or set it to null. "
            "(CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts gives N host devices.)"
        )
    return Mesh(np.asarray(devices[:n]), (AXIS,))


def check_batch(mesh: Mesh, batch_size: int, grad_accum: int = 1) -> None:
    micro = batch_size // grad_accum
    n = mesh.size
    if micro % n:
        raise ValueError(
            f"train.batch_size={batch_size} (microbatch {micro} with grad_accum={grad_accum}) does not split over "
            f"{n} devices: make the microbatch a multiple of {n}, or set sharding.n_devices."
        )


def leaf_spec(shape: tuple[int, ...], mode: str, n: int, min_params: int) -> P:
    """FSDP: shard the largest dimension divisible by the mesh size; small or indivisible leaves replicate."""
    if mode == "dp" or n == 1 or int(np.prod(shape, dtype=np.int64)) < min_params:
        return P()
    dims = sorted((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: -shape[d])
    if not dims:
        return P()
    spec = [None] * len(shape)
    spec[dims[0]] = AXIS
    return P(*spec)


def state_shardings(state: PyTree, mesh: Mesh, cfg: ShardingConfig, leading_axes: int = 0) -> PyTree:
    """NamedSharding per leaf of `state` (arrays or ShapeDtypeStructs). `leading_axes` dims (e.g. the K models of a
    vmapped state) are never sharded."""

    def one(x) -> NamedSharding:
        shape = tuple(x.shape)
        spec = leaf_spec(shape[leading_axes:], cfg.mode, mesh.size, cfg.fsdp_min_params)
        return NamedSharding(mesh, P(*([None] * leading_axes), *spec))

    return jax.tree_util.tree_map(one, state)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = AXIS
    return NamedSharding(mesh, P(*spec))


def put_batch(batch: np.ndarray, mesh: Mesh, batch_axis: int) -> jax.Array:
    """A global array split along `batch_axis`; every process holds the same numpy batch and places its own shards.

    A batch that does not split evenly (a short eval batch) is replicated instead.
    """
    if batch.shape[batch_axis] % mesh.size:
        sharding = NamedSharding(mesh, P())
    else:
        sharding = batch_sharding(mesh, batch.ndim, batch_axis)
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def init_sharded(init_fn, shardings_fn) -> tuple[PyTree, PyTree]:
    """Runs `init_fn()` under jit straight into its shardings: no device ever holds the whole FSDP state."""
    abstract = jax.eval_shape(init_fn)
    shardings = shardings_fn(abstract)
    return jax.jit(init_fn, out_shardings=shardings)(), shardings


def constrain(tree: PyTree, shardings: Optional[PyTree]) -> PyTree:
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def describe(state: PyTree) -> dict:
    """How much of the state each device holds: {"bytes_total", "bytes_per_device_max", "sharded_leaves", "leaves"}."""
    leaves = jax.tree_util.tree_leaves(state)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device: dict = {}
    sharded = 0
    for x in leaves:
        shards = x.addressable_shards
        if any(s.data.shape != x.shape for s in shards):
            sharded += 1
        for s in shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.size * s.data.dtype.itemsize
    return {"bytes_total": int(total), "bytes_per_device_max": int(max(per_device.values())),
            "sharded_leaves": sharded, "leaves": len(leaves)}
