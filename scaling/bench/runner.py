"""Throughput benchmark: `python -m scaling.bench --preset nanogpt|cpu|gpu|tiny [--json OUT]`.

For each model shape it times this project's train step (scaling.train.loop.make_train_step: AdamW, clipping, donation)
and, on CPU, the reference steps of scaling/bench/references.py on the same shape: a plain Flax linen + optax step, nanoGPT's
PyTorch model eager and under torch.compile. Every measurement runs in its own process (`--worker`), one after the
other, with the same threads (`--threads`, default every core: the process is pinned to that many cores and
OMP/MKL/torch are told the same number), so no framework's thread pool competes with another's.

The machine's load is part of every figure: the 1-minute load average is read before the run (above `--max-load` the
run is refused unless `--allow-busy`) and before and after each measurement, and the CPU time other processes used
*during* each measurement is measured (/proc/stat less the worker's own CPU time). The load average cannot judge a
single measurement, since after the first one it counts our own worker's threads too; the other processes' CPU time
can, and a row where it exceeds `--max-load` cores is marked BUSY in the table. A shared VM's speed also drifts by
5-10% between minutes (eager PyTorch at d384: 1,547-1,715 ms per step in three runs within ten minutes, session 16):
`--repeats R` measures in R interleaved rounds (this step, then each reference, each in its own process) and reports
each implementation's median with the range of its samples.

Per row: N, tokens/s (median step), step ms, achieved FLOP/s (chinchilla convention, scaling.accounting), MFU against
the device peak (datasheet on GPU/TPU, the measured XLA matmul peak on CPU), compile seconds, peak memory, the
attention implementation that actually ran (read from the compiled HLO, never assumed), and the ratios to the
references. `--profile` adds a per-op profile of one step (jax.profiler, grouped by model part). The vmap section
times K models in one step (scaling.train.stack) against one model.

JAX is imported lazily (inside functions): the GPU preset sets XLA_FLAGS, and the parent process never starts JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

# XLA flags of the GPU preset, each one checked to exist in this XLA build (an unknown flag aborts at start-up):
GPU_XLA_FLAGS = {
    # cuBLAS rather than Triton-generated GEMMs: cuBLAS is the faster kernel for large bf16 matmuls on H100
    # (the choice MaxText and Paxml GPU recipes make); compare with --xla-flags none on the device.
    "--xla_gpu_enable_triton_gemm": "false",
    # Schedules independent async work (copies, collectives) to overlap compute; harmless on one GPU, needed on many.
    "--xla_gpu_enable_latency_hiding_scheduler": "true",
}


@dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    vocab_size: int
    batch: int


# nanogpt: the four shapes of issue 15 (batch 16, vocab 4096, head dim 32); cpu: ~100k to ~10M non-embedding params
# with the 4096-token BPE of the default data; gpu: GPT-2 small and medium.
PRESETS = {
    "tiny": [Shape("tiny", 32, 2, 2, 32, 256, 4)],
    "nanogpt": [
        Shape("d64-L2-T128", 64, 2, 2, 128, 4096, 16),
        Shape("d128-L4-T128", 128, 4, 4, 128, 4096, 16),
        Shape("d256-L4-T256", 256, 4, 8, 256, 4096, 16),
        Shape("d384-L6-T256", 384, 6, 12, 256, 4096, 16),
    ],
    "cpu": [
        Shape("cpu-100k", 64, 2, 2, 128, 4096, 16),
        Shape("cpu-1M", 128, 6, 4, 128, 4096, 16),
        Shape("cpu-3M", 192, 6, 6, 256, 4096, 8),
        Shape("cpu-10M", 256, 12, 8, 256, 4096, 8),
    ],
    "gpu": [
        Shape("gpt2-124M", 768, 12, 12, 1024, 50257, 32),
        Shape("gpt2-350M", 1024, 24, 16, 1024, 50257, 16),
    ],
}
# (label, ModelConfig overrides) run for every shape of the preset.
VARIANTS = {
    "tiny": [("f32", {})],
    "nanogpt": [("f32", {})],
    "cpu": [("f32", {})],
    "gpu": [
        ("bf16-cudnn", {"compute_dtype": "bfloat16", "attention": "cudnn"}),
        ("bf16-cudnn-dots", {"compute_dtype": "bfloat16", "attention": "cudnn", "remat": "dots_saveable"}),
    ],
}
VMAP_SHAPE = {"tiny": PRESETS["tiny"][0], "cpu": Shape("vmap-100k", 64, 2, 2, 128, 4096, 8),
              "nanogpt": Shape("vmap-100k", 64, 2, 2, 128, 4096, 8), "gpu": Shape("vmap-3M", 192, 6, 6, 256, 4096, 16)}
# The reference steps (scaling/bench/references.py), timed on the first variant of every shape; column titles.
REFERENCES = {"linen": "linen", "torch": "torch eager", "torch-compile": "torch.compile"}
DEFAULT_REFS = {"tiny": ["linen", "torch"], "nanogpt": list(REFERENCES), "cpu": list(REFERENCES), "gpu": []}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def model_config(shape: Shape, overrides: dict):
    from scaling.model.decoder import ModelConfig

    return ModelConfig(d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads, seq_len=shape.seq_len,
                       vocab_size=shape.vocab_size, **overrides)


def attention_used(model, hlo_text: str) -> str:
    """What the compiled step really calls: cuDNN's fused attention shows up as a custom call."""
    if "__cudnn$fmha" in hlo_text or "cudnn$fmha" in hlo_text:
        return "cudnn"
    from scaling.model.decoder import resolve_attention

    impl = resolve_attention(model.attention)
    return impl if impl in ("einsum", "blocked") else "xla"


def _timed(fn, state, batch, warmup: int, steps: int):
    """Median seconds of one step (each step waited for: a median resists a neighbour's burst), the last metrics and
    the last state (the step donates its input state)."""
    import jax
    import jax.numpy as jnp

    for i in range(warmup):
        state, _ = fn(state, batch, jnp.asarray(i))
    jax.block_until_ready(state)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = fn(state, batch, jnp.asarray(warmup + i))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), metrics, state


def _peak_memory(compiled, device) -> Optional[int]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    try:  # CPU: XLA's own buffer assignment (arguments + outputs + temporaries, less donated aliases)
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory is informative, never a reason to lose the timing
        return None


def step_setup(shape: Shape, overrides: dict, steps_per_call: int = 1, devices: int = 1, grad_accum: int = 1):
    """The training loop's step on `shape`, ready to lower: (model, jitted step, state, lowering arguments, call),
    where `call(compiled, state, i)` runs the i-th call (steps_per_call steps) and returns (state, metrics). Shared by
    the bench, benchmarks/compile_time.py and benchmarks/interleaved.py, so all three time the same step."""
    import jax
    import jax.numpy as jnp

    from scaling.model.decoder import init_params
    from scaling.train.optim import OptimConfig
    from scaling.train.loop import chunk_lrs, make_train_step

    model = model_config(shape, overrides)
    optim = OptimConfig(warmup_steps=0)
    lr_at, with_lr = optim.with_lr_input(10_000)  # the trainer's step: the lr an input, the schedule evaluated outside
    P = steps_per_call
    A = grad_accum  # the same tokens in A microbatches, scanned (train.grad_accum)
    if A < 1 or shape.batch % A:
        raise ValueError(f"grad_accum={A} does not split {shape.name}'s batch of {shape.batch} sequences into equal "
                         "microbatches: give a divisor of the batch size.")
    # P > 1: P different batches per call, as the loop's chunks (a repeated batch would train on one batch)
    batch = jax.random.randint(jax.random.key(1), (P, 1, shape.batch, shape.seq_len + 1) if P > 1 else
                               (1, shape.batch, shape.seq_len + 1), 0, shape.vocab_size)
    batch = batch.reshape(*batch.shape[:-3], A, shape.batch // A, shape.seq_len + 1)
    params = init_params(model, jax.random.key(0))  # runs the forward: the first place attention can fail
    state = {"params": params, "opt_state": optim.build(10_000).init(params)}
    shardings = None
    if devices > 1:  # the training loop's own placement: sharding.cpu_devices=N sharding.mode=fsdp
        import numpy as np

        from scaling.train.sharding import ShardingConfig, make_mesh, put_batch, state_shardings

        sharding = ShardingConfig(mode="fsdp", n_devices=devices)
        mesh = make_mesh(sharding)
        shardings = state_shardings(state, mesh, sharding)
        state, batch = jax.device_put(state, shardings), put_batch(np.asarray(batch), mesh, 2 if P > 1 else 1)
    step = make_train_step(model, with_lr, A, 0, shardings, P)
    step0 = jnp.asarray(0)
    if P > 1:
        lrs = chunk_lrs(lr_at, 0, P, P)
        call = lambda compiled, state, i: compiled(state, batch, jnp.asarray(i * P), lrs, jnp.asarray(P))  # noqa: E731
        return model, step, state, (state, batch, step0, lrs, jnp.asarray(P)), call
    call = lambda compiled, state, i: compiled(state, batch, jnp.asarray(i), lr_at(jnp.asarray(i)))  # noqa: E731
    return model, step, state, (state, batch, step0, lr_at(step0)), call


def bench_jax(shape: Shape, overrides: dict, warmup: int, steps: int, peak: float, profile: bool = False,
              devices: int = 1, steps_per_call: int = 1) -> dict:
    """The training loop's step on `shape`; with `steps_per_call` > 1, as the loop runs it by default
    (scaling.train.loop.chain_steps): calls of that many steps, timed per step (call time / steps_per_call)."""
    import jax

    from scaling.accounting import count_params, flops_per_token

    model = model_config(shape, overrides)
    P = steps_per_call
    try:
        model, step, state, lower_args, call = step_setup(shape, overrides, P, devices)
        t0 = time.perf_counter()
        compiled = step.lower(*lower_args).compile()
    except Exception as e:
        if model.attention == "cudnn":
            raise RuntimeError(
                f"model.attention=cudnn was requested but cuDNN attention is unavailable on "
                f"{jax.devices()[0].device_kind} ({type(e).__name__}: {e}); refusing to fall back to the slower XLA "
                "attention silently: install jax[cuda12] with cuDNN >= 9 on an NVIDIA GPU, or ask for attention=xla."
            ) from e
        raise
    compile_s = time.perf_counter() - t0
    used = attention_used(model, compiled.as_text())
    if model.attention == "cudnn" and used != "cudnn":
        raise RuntimeError("model.attention=cudnn was requested but the compiled step holds no cuDNN attention call.")
    # _timed's and profile_step's (state, batch, i) signature; the batch is the one step_setup built and `call` holds
    step = lambda state, _batch, i: call(compiled, state, i)  # noqa: E731
    batch = lower_args[1]
    # P > 1: as many timed steps as P = 1 would time, in calls of P (at least 3 calls, for the median)
    call_s, metrics, state = _timed(step, state, batch, -(-warmup // P), max(3, -(-steps // P)))
    step_s = call_s / P
    metrics = {**metrics, "train_loss": metrics["train_loss"][-1] if P > 1 else metrics["train_loss"]}
    ops = profile_step(compiled, step, state, batch) if profile else None
    tokens_per_s = shape.batch * shape.seq_len / step_s
    achieved = tokens_per_s * flops_per_token(model, "chinchilla")
    return {
        "shape": shape.name, "variant": None, "N": count_params(model).non_embedding, "N_total": count_params(model).total,
        "batch": shape.batch, "seq_len": shape.seq_len, "tokens_per_s": tokens_per_s, "step_ms": 1e3 * step_s,
        "flops_per_s": achieved, "mfu": achieved / peak, "compile_s": compile_s,
        "peak_memory_bytes": _peak_memory(compiled, jax.devices()[0]), "attention": used,
        "compute_dtype": model.compute_dtype, "remat": model.remat, "loss": float(metrics["train_loss"]),
        "mesh_devices": devices, "steps_per_call": P,
        **({"profile": ops} if ops else {}),
    }


def bench_vmap(shape: Shape, ks: list[int], warmup: int, steps: int) -> list[dict]:
    """tokens/s summed over K models in one vmapped step, against one model stepped alone (the K separate runs)."""
    import jax

    from scaling.model.decoder import init_params
    from scaling.train.stack import init_many, make_multi_step, unit_lr_optimizer
    from scaling.train.optim import OptimConfig
    from scaling.train.loop import make_train_step

    model = model_config(shape, {})
    batch = jax.random.randint(jax.random.key(1), (1, shape.batch, shape.seq_len + 1), 0, shape.vocab_size)
    tokens = shape.batch * shape.seq_len
    opt = OptimConfig(warmup_steps=0).build(10_000)
    params = init_params(model, jax.random.key(0))
    single_s, _, _ = _timed(make_train_step(model, opt, 1, 0), {"params": params, "opt_state": opt.init(params)},
                         batch, warmup, steps)
    rows = [{"K": 1, "mode": "single", "step_ms": 1e3 * single_s, "tokens_per_s": tokens / single_s, "speedup": 1.0}]
    unit = unit_lr_optimizer(OptimConfig(warmup_steps=0), 10_000)
    for k in ks:
        state = init_many(model, unit, list(range(k)), [3e-3 * 2 ** (i / 2) for i in range(k)])
        step_s, _, _ = _timed(make_multi_step(model, unit, 1, 0, shared_batch=True), state, batch, warmup, steps)
        rows.append({"K": k, "mode": "vmap", "step_ms": 1e3 * step_s, "tokens_per_s": k * tokens / step_s,
                     "speedup": k * single_s / step_s})
    return rows


def profile_step(compiled, step, state, batch, steps: int = 2) -> list[dict]:
    """Where one step's time goes: jax.profiler's per-thunk (XLA fusion / library call) times, grouped by the model
    part each fusion came from (its HLO op_name metadata) and by forward / backward. Milliseconds per step."""
    import collections
    import glob
    import gzip
    import re
    import tempfile

    import jax
    import jax.numpy as jnp

    origin = {}  # fusion name -> op_name of its metadata
    for line in compiled.as_text().splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', line)
        if m:
            origin.setdefault(m.group(1), m.group(2))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for i in range(steps):
                state, _ = step(state, batch, jnp.asarray(10_000 + i))
            jax.block_until_ready(state)
        with gzip.open(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]) as f:
            events = json.load(f)["traceEvents"]
    ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in origin:
            ms[profile_group(e["name"], origin[e["name"]])] += e["dur"] / 1e3 / steps
    total = sum(ms.values())
    return [{"group": g, "ms": t, "share": t / total} for g, t in ms.most_common()]


def profile_group(fusion: str, op_name: str) -> str:
    """'fwd|bwd <model part> <matmul|other>' from a fusion's op_name, e.g. 'bwd attn other', 'fwd mlp/fc matmul'."""
    import re

    direction = "bwd" if "transpose(" in op_name else "fwd"
    library = "ynn" in fusion or "onednn" in fusion  # XLA:CPU's library fusions (YNNPACK, or oneDNN when enabled)
    kind = "matmul" if ("dot_general" in op_name.rsplit("/", 1)[-1] and library) or fusion.startswith(
        "dot") else "other"
    for part, pattern in (("attn/qkv", "/attn/qkv/"), ("attn/proj", "/attn/proj/"), ("attn core", "/attn/"),
                          ("mlp/fc", "/mlp/fc/"), ("mlp/proj", "/mlp/proj/"), ("mlp gelu", "/mlp/"),
                          ("layernorm", r"/ln_(1|2|f)/"), ("head (wte.attend)", "wte.attend"),
                          ("embedding", "/wte/|/wpe/")):
        if re.search(pattern, op_name):
            return f"{direction} {part} {kind}"
    if "Transformer" not in op_name and direction == "fwd":
        return "optimizer, loss & rest"
    return f"{direction} residual/loss/other {kind}"


# ---------------------------------------------------------------------------------------------------------------
# One measurement per process.


def _pin_threads(threads: int) -> None:
    """Every implementation gets the same cores: the process is pinned to `threads` of them (XLA sizes its pool by
    the cores it may use), and OMP/MKL (set by the parent's environment) and torch are told the same number."""
    if hasattr(os, "sched_setaffinity") and threads < len(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def _time_reference(step, warmup: int, steps: int) -> dict:
    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"step_ms": 1e3 * statistics.median(times), "first_step_s": first_s, "loss": loss}


def worker(spec: dict) -> dict:
    """Runs one measurement (spec from `_measure`) in this process and returns its row, with the process id and the
    cores it was allowed."""
    _pin_threads(spec["threads"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        return {**_run_one(spec), "pid": os.getpid(), "cores": cores}
    except ImportError as e:  # only the optional PyTorch reference may be missing
        return {"error": f"{e.name or e} not installed (pip install -e '.[bench]')", "pid": os.getpid()}


def reference_dims(shape: Shape) -> dict:
    """The keyword arguments of references.torch_step / linen_step for `shape` (compile_model aside), with this
    project's parameter count, which each reference asserts it matches."""
    from scaling.accounting import count_params

    return dict(d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads, seq_len=shape.seq_len,
                vocab_size=shape.vocab_size, batch=shape.batch,
                expected_params=count_params(model_config(shape, {})).total)


def _run_one(spec: dict) -> dict:
    shape, impl = Shape(**spec["shape"]), spec["impl"]
    if impl == "jax":
        import jax

        from scaling.accounting import PEAK_FLOPS, peak_flops_per_device

        from scaling.train.sharding import ShardingConfig, configure_cpu_devices

        devices = spec.get("cpu_devices", 1)
        configure_cpu_devices(ShardingConfig(cpu_devices=devices))  # as the training loop: before the backend starts
        kind = jax.devices()[0].device_kind
        peak = peak_flops_per_device(kind, spec["peak_flops"])
        from scaling.config import TrainConfig

        P = spec.get("steps_per_call") or TrainConfig().steps_per_call  # None: what a training run uses
        row = bench_jax(shape, spec["overrides"], spec["warmup"], spec["steps"], peak, spec.get("profile", False),
                        devices, P)
        on_table = spec["peak_flops"] or any(k.lower() in kind.lower() for k in PEAK_FLOPS)
        return {**row, "device_kind": kind, "platform": jax.devices()[0].platform, "n_devices": jax.device_count(),
                "peak_flops": peak, "peak_source": "datasheet/override" if on_table else "measured XLA f32 matmul",
                "jax": jax.__version__}
    if impl == "vmap":
        return {"rows": bench_vmap(shape, spec["ks"], spec["warmup"], spec["steps"])}
    from scaling.bench import references as bench_refs

    dims = reference_dims(shape)
    if impl == "linen":
        step = bench_refs.linen_step(**dims)
        version = __import__("flax").__version__
    else:
        import torch

        torch.set_num_threads(spec["threads"])
        step = bench_refs.torch_step(**dims, compile_model=impl == "torch-compile")
        version = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    row = _time_reference(step, spec["warmup"], spec["steps"])
    return {**row, "tokens_per_s": shape.batch * shape.seq_len / (row["step_ms"] / 1e3), "version": version}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere, often empty on Linux). Ratios to
    PyTorch depend on it: its oneDNN/MKL kernels were 1.5-1.9x faster on an Intel Xeon than on an AMD EPYC VM where
    XLA's ran at the same speed (BENCHMARKS.md, session 8)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _busy_cpu_seconds() -> Optional[float]:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _measure(spec: dict, env: dict, timeout: float) -> dict:
    """One worker process: its row plus the load around it (1-minute load average before/after, and the cores that
    other processes kept busy while it ran)."""
    load_before, busy0, wall0 = os.getloadavg(), _busy_cpu_seconds(), time.perf_counter()
    own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "scaling.bench", "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_ROW ")]
        row = json.loads(lines[-1][len("BENCH_ROW "):]) if lines else {
            "error": f"worker exited with {done.returncode} (its stderr is above)"}
    except subprocess.TimeoutExpired:
        row = {"error": f"worker timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - wall0
    own1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_cpu_seconds()
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    others = None if busy0 is None else max(0.0, (busy1 - busy0 - own) / wall)
    return {**row, "load": {"loadavg_before": load_before, "loadavg_after": os.getloadavg(), "other_cores": others}}


def median_row(rows: list[dict]) -> dict:
    """One implementation's repeated measurements as one row: the measurement with the median tokens/s (the lower
    one of an even count), the tokens/s of all of them ("samples", in the order taken), and the load from the first
    one's start to the last one's end with the most cores others kept busy in any of them."""
    good = [r for r in rows if "tokens_per_s" in r]
    if not good:
        return rows[-1]
    median = sorted(good, key=lambda r: r["tokens_per_s"])[(len(good) - 1) // 2]
    loads = [r["load"] for r in rows if r.get("load")]
    others = [ld["other_cores"] for ld in loads if ld["other_cores"] is not None]
    load = loads and {"loadavg_before": loads[0]["loadavg_before"], "loadavg_after": loads[-1]["loadavg_after"],
                      "other_cores": max(others) if others else None}
    return {**median, "samples": [r["tokens_per_s"] for r in good], **({"load": load} if load else {})}


def _tokens_cell(measured: dict) -> str:
    """tokens/s, with the range of the samples when measured more than once: '2,394 (2,377-2,410)'."""
    samples = measured.get("samples", [])
    cell = f"{measured['tokens_per_s']:,.0f}"
    return cell + (f" ({min(samples):,.0f}-{max(samples):,.0f})" if len(samples) > 1 else "")


def _worker_env(threads: int) -> dict:
    env = {**os.environ, **{name: str(threads) for name in THREAD_ENV}}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# ---------------------------------------------------------------------------------------------------------------


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def row_busy(row: dict, max_load: float) -> bool:
    """Any measurement of the row (ours or a reference's) ran while other processes kept > max_load cores busy."""
    loads = [row.get("load")] + [ref.get("load") for ref in row.get("refs", {}).values()]
    return any(ld and ld["other_cores"] is not None and ld["other_cores"] > max_load for ld in loads)


def _load_cell(row: dict, max_load: float) -> str:
    loads = [ld for ld in [row.get("load")] + [r.get("load") for r in row.get("refs", {}).values()] if ld]
    if not loads:
        return "-"
    others = [ld["other_cores"] for ld in loads if ld["other_cores"] is not None]
    first, last = loads[0]["loadavg_before"][0], loads[-1]["loadavg_after"][0]
    cell = f"{first:.1f}->{last:.1f}" + (f", others {max(others):.2f}" if others else "")
    return cell + (" BUSY" if row_busy(row, max_load) else "")


def format_table(report: dict) -> str:
    refs = report.get("refs", [])
    head = ["shape", "variant", "N", "BxL", "tokens/s", "step ms", "FLOP/s", "MFU", "compile s", "peak mem",
            "attention"]
    head += [f"{REFERENCES[r]} tok/s" for r in refs] + [f"x {REFERENCES[r]}" for r in refs] + ["load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | error: {r['error'][:150]} |")
            continue
        cells = [r["shape"], r["variant"], _fmt(r["N"]), f"{r['batch']}x{r['seq_len']}", _tokens_cell(r),
                 f"{r['step_ms']:.1f}", _fmt(r["flops_per_s"]), f"{100 * r['mfu']:.1f}%", f"{r['compile_s']:.1f}",
                 _fmt(r["peak_memory_bytes"], "B"), r["attention"]]
        theirs = [r.get("refs", {}).get(name, {}) for name in refs]
        cells += [_tokens_cell(t) if "tokens_per_s" in t else t.get("error", "-")[:60] for t in theirs]
        cells += [f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x" if "tokens_per_s" in t else "-" for t in theirs]
        lines.append("| " + " | ".join(cells + [_load_cell(r, report["max_load"])]) + " |")
    out = [f"device: {report.get('device_kind')} x{report.get('n_devices')} ({report.get('host')}), "
           f"peak {_fmt(report.get('peak_flops'))}FLOP/s ({report.get('peak_source')}), {report['threads']} threads; 1-minute load average "
           f"{report['loadavg_start'][0]:.2f} at the start, {report['loadavg_end'][0]:.2f} at the end", *lines]
    if any(row_busy(r, report["max_load"]) for r in report["rows"]):
        out.append(f"BUSY: other processes kept more than {report['max_load']} cores busy during a measurement of "
                   "that row: its figures are not those of a quiet machine.")
    for r in report["rows"]:
        if r.get("profile"):
            out += ["", f"profile of one step, {r['shape']} {r['variant']} ({r['step_ms']:.0f} ms wall; "
                    "ms summed over XLA thunks, which may overlap on the threads):",
                    "| group | ms | share |", "|---|---|---|"]
            out += [f"| {p['group']} | {p['ms']:.1f} | {100 * p['share']:.1f}% |" for p in r["profile"]]
    if report.get("vmap"):
        v = report["vmap"]
        out += ["", f"vmap over K models ({v['shape']}, N={_fmt(v['N'])}, {v['batch']}x{v['seq_len']} tokens per model "
                "per step; tokens/s summed over models):",
                "| K | mode | step ms | tokens/s | speed-up vs K separate steps |", "|---|---|---|---|---|"]
        out += [f"| {r['K']} | {r['mode']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x |"
                for r in v["rows"]]
    return "\n".join(out)


def run(args: argparse.Namespace) -> dict:
    from scaling.accounting import count_params

    load = os.getloadavg()
    if load[0] > args.max_load and not args.allow_busy:
        raise SystemExit(
            f"refusing to benchmark: the 1-minute load average is {load[0]:.2f} > --max-load {args.max_load} "
            f"on {os.cpu_count()} cores, so other processes would share the cores and every figure would be "
            "theirs as much as ours. Wait for a quiet machine, or pass --allow-busy to measure anyway (rows "
            "measured while others were busy are marked BUSY)."
        )
    report = {
        "command": " ".join(["python -m scaling.bench", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(), "threads": args.threads, "host": cpu_model(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "loadavg_start": load, "max_load": args.max_load,
        "refs": args.refs, "rows": [],
    }
    env = _worker_env(args.threads)
    base = {"threads": args.threads, "warmup": args.warmup, "steps": args.steps, "peak_flops": args.peak_flops}
    shapes = [s for s in PRESETS[args.preset] if not args.shapes or s.name in args.shapes]
    variants = list(VARIANTS[args.preset])
    if args.scan if args.scan is not None else args.preset == "gpu":
        # The same step with nn.scan over the layers: compile time no longer grows with depth; compare both rows.
        variants += [(f"{label}-scan", {**o, "scan_layers": True}) for label, o in VARIANTS[args.preset]]
    # CPU: the same step data parallel (FSDP) over the host split into d XLA devices (sharding.cpu_devices).
    variants = [(label if d == 1 else f"{label}-fsdp{d}", o, d) for label, o in variants for d in args.cpu_devices]
    for shape in shapes:
        for i, (label, overrides, devices) in enumerate(variants):
            if args.attention:
                overrides = {**overrides, "attention": args.attention}
            overrides = {**overrides, **args.set}
            spec = {**base, "impl": "jax", "shape": asdict(shape), "overrides": overrides, "profile": args.profile,
                    "cpu_devices": devices, "steps_per_call": args.steps_per_call}
            # --repeats: rounds of (this step, then each reference), each measurement in its own process, so a slow
            # spell of the machine lands on every implementation alike; the median of each is reported.
            ours: list[dict] = []
            theirs: dict[str, list[dict]] = {name: [] for name in (args.refs if i == 0 else [])}
            for repeat in range(args.repeats):
                ours.append(_measure({**spec, "profile": args.profile and repeat == 0}, env, args.timeout))
                if "error" in ours[-1]:
                    break
                for name in theirs:
                    theirs[name].append(_measure({**base, "impl": name, "shape": asdict(shape)}, env, args.timeout))
            row = {"shape": shape.name, **median_row(ours), "variant": label}
            if "error" in row and args.strict:
                raise RuntimeError(f"{shape.name} {label}: {row['error']}")
            for key in ("device_kind", "platform", "n_devices", "peak_flops", "peak_source", "jax"):
                if key in row:
                    report.setdefault(key, row.pop(key))
            if theirs and "error" not in row:
                row["refs"] = {name: median_row(rows) for name, rows in theirs.items()}
            report["rows"].append(row)
            print(format_table({**report, "rows": [row], "loadavg_end": os.getloadavg()}).splitlines()[3],
                  flush=True)
    if args.vmap:
        shape = VMAP_SHAPE[args.preset]
        done = _measure({**base, "impl": "vmap", "shape": asdict(shape), "ks": args.vmap}, env, args.timeout)
        report["vmap"] = {"shape": shape.name, "N": count_params(model_config(shape, {})).non_embedding,
                          "batch": shape.batch, "seq_len": shape.seq_len, "rows": done.get("rows", []),
                          "load": done["load"], **({"error": done["error"]} if "error" in done else {})}
    report["loadavg_end"] = os.getloadavg()
    return report


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scaling.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="nanogpt")
    p.add_argument("--shapes", nargs="*", help="only these shape names of the preset")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default: gpu 20, else 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn", "einsum", "blocked"],
                   help="override every variant's attention")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="ModelConfig overrides for this project's step, e.g. --set attention=xla head_loss=reference "
                        "(the step before the CPU work of issue 15)")
    p.add_argument("--refs", type=lambda s: [r for r in s.split(",") if r], default=None,
                   help=f"reference steps, comma-separated from {','.join(REFERENCES)} (default: all on CPU presets, "
                        "none on gpu; empty string: none)")
    p.add_argument("--no-torch", action="store_true", help="drop the PyTorch references")
    p.add_argument("--torch-compile", action="store_true", help="(kept for old commands: torch.compile is a default "
                                                                "reference now)")
    p.add_argument("--cpu-devices", type=lambda s: [int(d) for d in s.split(",") if d], default=[1],
                   help="CPU: also time the step data parallel (FSDP) over the host split into this many XLA devices, "
                        "e.g. 1,2 (sharding.cpu_devices)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores every implementation may use")
    p.add_argument("--max-load", type=float, default=1.0,
                   help="refuse to start above this 1-minute load average; mark rows BUSY when other processes kept "
                        "more cores than this busy during a measurement")
    p.add_argument("--allow-busy", action="store_true", help="measure even above --max-load (rows marked BUSY)")
    p.add_argument("--profile", action="store_true", help="add a per-op profile of one step of every JAX row")
    p.add_argument("--vmap", type=lambda s: [int(k) for k in s.split(",") if k], default=None,
                   help="K values for the vmap section, e.g. 4,8,16 (default: 4,8,16 on cpu/gpu, none on nanogpt; "
                        "empty string: skip)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                   help="also time every variant with model.scan_layers=true (default: on for the gpu preset)")
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s for MFU")
    p.add_argument("--xla-flags", choices=["default", "none"], default="default",
                   help="gpu preset: add GPU_XLA_FLAGS to XLA_FLAGS (default) or leave XLA_FLAGS as is")
    p.add_argument("--steps-per-call", type=_positive_int, default=None,
                   help="optimizer steps per call of the compiled step (default: train.steps_per_call's default)")
    p.add_argument("--repeats", type=_positive_int, default=1,
                   help="measure every implementation this many times, in interleaved rounds (ours, then each "
                        "reference), each in its own process; report the median and the range")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one measurement (one process) may take")
    p.add_argument("--strict", action="store_true", help="raise on the first failing shape instead of reporting it")
    p.add_argument("--json", help="also write the report as JSON to this path")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement's spec, as JSON
    args = p.parse_args(argv)
    if args.worker:
        return args
    try:
        args.set = {k: _literal(v) for k, v in (item.split("=", 1) for item in args.set)}
    except ValueError:
        p.error(f"--set takes FIELD=VALUE pairs, got {args.set}")
    if args.steps is None:
        args.steps = 20 if args.preset == "gpu" else 10
    if args.refs is None:
        args.refs = list(DEFAULT_REFS[args.preset])
    if args.no_torch:
        args.refs = [r for r in args.refs if not r.startswith("torch")]
    unknown = [r for r in args.refs if r not in REFERENCES]
    if unknown:
        p.error(f"--refs {','.join(unknown)} unknown: choose from {','.join(REFERENCES)}")
    if args.vmap is None:
        args.vmap = [] if args.preset == "nanogpt" else [4, 8, 16]
    if args.steps <= 0 or args.warmup < 0:
        p.error(f"--steps={args.steps} must be positive and --warmup={args.warmup} non-negative")
    if not args.cpu_devices or min(args.cpu_devices) < 1:
        p.error(f"--cpu-devices {args.cpu_devices} must list positive device counts, e.g. 1,2")
    if not 1 <= args.threads <= (os.cpu_count() or 1):
        p.error(f"--threads={args.threads} must be between 1 and the {os.cpu_count()} cores of this machine")
    return args


def _literal(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        row = worker(json.loads(args.worker))
        print("BENCH_ROW " + json.dumps(row, default=str), flush=True)
        return row
    if args.preset == "gpu" and args.xla_flags == "default":
        flags = " ".join(f"{k}={v}" for k, v in GPU_XLA_FLAGS.items())
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    report = run(args)
    print(format_table(report))
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(tmp, args.json)
    return report
