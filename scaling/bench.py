"""Throughput benchmark: `python -m scaling.bench --preset cpu|gpu|tiny [--json OUT]`.

For each model shape it compiles the real train step (scaling.train.make_train_step: AdamW, clipping, donation),
runs warm-up steps, then times steady-state steps with block_until_ready, and prints one table: N, tokens/s, step ms,
achieved FLOP/s (chinchilla convention, scaling.accounting), MFU against the device peak (datasheet on GPU/TPU, the
measured XLA matmul peak on CPU), compile seconds, peak memory and the attention implementation that actually ran
(read from the compiled HLO, never assumed). With --torch, a nanoGPT-style PyTorch model of the identical shape (same
init, tied head, AdamW, clipping) is timed in the same run. The vmap section times K models in one step
(scaling.multi) against one model.

JAX is imported lazily (inside functions) because --preset gpu must set XLA_FLAGS before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
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


# CPU: ~100k to ~10M non-embedding params with the 4096-token BPE of the default data; GPU: GPT-2 small and medium.
PRESETS = {
    "tiny": [Shape("tiny", 32, 2, 2, 32, 256, 4)],
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
    "cpu": [("f32", {})],
    "gpu": [
        ("bf16-cudnn", {"compute_dtype": "bfloat16", "attention": "cudnn"}),
        ("bf16-cudnn-dots", {"compute_dtype": "bfloat16", "attention": "cudnn", "remat": "dots_saveable"}),
    ],
}
VMAP_SHAPE = {"tiny": PRESETS["tiny"][0], "cpu": Shape("vmap-100k", 64, 2, 2, 128, 4096, 8),
              "gpu": Shape("vmap-3M", 192, 6, 6, 256, 4096, 16)}


def model_config(shape: Shape, overrides: dict):
    from scaling.model import ModelConfig

    return ModelConfig(d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads, seq_len=shape.seq_len,
                       vocab_size=shape.vocab_size, **overrides)


def attention_used(model, hlo_text: str) -> str:
    """What the compiled step really calls: cuDNN's fused attention shows up as a custom call."""
    if "__cudnn$fmha" in hlo_text or "cudnn$fmha" in hlo_text:
        return "cudnn"
    return "einsum" if model.attention == "einsum" else "xla"


def _timed(fn, state, batch, warmup: int, steps: int):
    import jax
    import jax.numpy as jnp

    for i in range(warmup):
        state, _ = fn(state, batch, jnp.asarray(i))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = fn(state, batch, jnp.asarray(warmup + i))
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t0) / steps, metrics


def _peak_memory(compiled, device) -> Optional[int]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    try:  # CPU: XLA's own buffer assignment (arguments + outputs + temporaries, less donated aliases)
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory is informative, never a reason to lose the timing
        return None


def bench_jax(shape: Shape, overrides: dict, warmup: int, steps: int, peak: float) -> dict:
    import jax
    import jax.numpy as jnp

    from scaling.accounting import count_params, flops_per_token
    from scaling.model import init_params
    from scaling.optim import OptimConfig
    from scaling.train import make_train_step

    model = model_config(shape, overrides)
    optimizer = OptimConfig(warmup_steps=0).build(10_000)
    batch = jax.random.randint(jax.random.key(1), (1, shape.batch, shape.seq_len + 1), 0, shape.vocab_size)
    try:
        params = init_params(model, jax.random.key(0))  # runs the forward: the first place attention can fail
        state = {"params": params, "opt_state": optimizer.init(params)}
        t0 = time.perf_counter()
        compiled = make_train_step(model, optimizer, 1, 0).lower(state, batch, jnp.asarray(0)).compile()
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
    step_s, metrics = _timed(compiled, state, batch, warmup, steps)
    tokens_per_s = shape.batch * shape.seq_len / step_s
    achieved = tokens_per_s * flops_per_token(model, "chinchilla")
    return {
        "shape": shape.name, "variant": None, "N": count_params(model).non_embedding, "N_total": count_params(model).total,
        "batch": shape.batch, "seq_len": shape.seq_len, "tokens_per_s": tokens_per_s, "step_ms": 1e3 * step_s,
        "flops_per_s": achieved, "mfu": achieved / peak, "compile_s": compile_s,
        "peak_memory_bytes": _peak_memory(compiled, jax.devices()[0]), "attention": used,
        "compute_dtype": model.compute_dtype, "remat": model.remat, "loss": float(metrics["train_loss"]),
    }


def bench_vmap(shape: Shape, ks: list[int], warmup: int, steps: int) -> list[dict]:
    """tokens/s summed over K models in one vmapped step, against one model stepped alone (the K separate runs)."""
    import jax

    from scaling.model import init_params
    from scaling.multi import init_many, make_multi_step, unit_lr_optimizer
    from scaling.optim import OptimConfig
    from scaling.train import make_train_step

    model = model_config(shape, {})
    batch = jax.random.randint(jax.random.key(1), (1, shape.batch, shape.seq_len + 1), 0, shape.vocab_size)
    tokens = shape.batch * shape.seq_len
    opt = OptimConfig(warmup_steps=0).build(10_000)
    params = init_params(model, jax.random.key(0))
    single_s, _ = _timed(make_train_step(model, opt, 1, 0), {"params": params, "opt_state": opt.init(params)},
                         batch, warmup, steps)
    rows = [{"K": 1, "mode": "single", "step_ms": 1e3 * single_s, "tokens_per_s": tokens / single_s, "speedup": 1.0}]
    unit = unit_lr_optimizer(OptimConfig(warmup_steps=0), 10_000)
    for k in ks:
        state = init_many(model, unit, list(range(k)), [3e-3 * 2 ** (i / 2) for i in range(k)])
        step_s, _ = _timed(make_multi_step(model, unit, 1, 0, shared_batch=True), state, batch, warmup, steps)
        rows.append({"K": k, "mode": "vmap", "step_ms": 1e3 * step_s, "tokens_per_s": k * tokens / step_s,
                     "speedup": k * single_s / step_s})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT-style PyTorch reference (Karpathy's nanoGPT model.py): the same shape, init, tied head and AdamW.


def bench_torch(shape: Shape, warmup: int, steps: int, compile_model: bool) -> dict:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    D, H, L, V = shape.d_model, shape.n_heads, shape.seq_len, shape.vocab_size

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = tnn.LayerNorm(D), tnn.LayerNorm(D)
            self.c_attn, self.attn_proj = tnn.Linear(D, 3 * D), tnn.Linear(D, D)
            self.c_fc, self.mlp_proj = tnn.Linear(D, 4 * D), tnn.Linear(4 * D, D)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
            q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = tnn.Embedding(V, D), tnn.Embedding(L, D)
            self.blocks = tnn.ModuleList(Block() for _ in range(shape.n_layers))
            self.ln_f = tnn.LayerNorm(D)
            for name, p in self.named_parameters():  # GPT-2 init, as scaling/model.py
                if p.dim() >= 2:
                    std = 0.02 / (2 * shape.n_layers) ** 0.5 if name.endswith("proj.weight") else 0.02
                    tnn.init.normal_(p, std=std)
                elif name.endswith("bias"):
                    tnn.init.zeros_(p)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
            return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.wte.weight]
    rest = [p for p in model.parameters() if p.dim() < 2 or p is model.wte.weight]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    fwd = torch.compile(model) if compile_model else model
    tokens = torch.randint(0, V, (shape.batch, L + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        loss = fwd(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    step_s = (time.perf_counter() - t0) / steps
    return {"torch_tokens_per_s": shape.batch * L / step_s, "torch_step_ms": 1e3 * step_s,
            "torch_first_step_s": compile_s, "torch_loss": float(loss.detach()), "torch_compiled": compile_model}


# ---------------------------------------------------------------------------------------------------------------


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def format_table(report: dict) -> str:
    head = ["shape", "variant", "N", "BxL", "tokens/s", "step ms", "FLOP/s", "MFU", "compile s", "peak mem", "attention"]
    torch_on = any("torch_tokens_per_s" in r or "torch_note" in r for r in report["rows"])
    if torch_on:
        head += ["torch tok/s", "jax/torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | error: {r['error'][:150]} |")
            continue
        cells = [r["shape"], r["variant"], _fmt(r["N"]), f"{r['batch']}x{r['seq_len']}", f"{r['tokens_per_s']:,.0f}",
                 f"{r['step_ms']:.1f}", _fmt(r["flops_per_s"]), f"{100 * r['mfu']:.1f}%", f"{r['compile_s']:.1f}",
                 _fmt(r["peak_memory_bytes"], "B"), r["attention"]]
        if torch_on:
            t = r.get("torch_tokens_per_s")
            cells += [f"{t:,.0f}" if t else r.get("torch_note", "-"), f"{r['tokens_per_s'] / t:.2f}x" if t else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    out = [f"device: {report['device_kind']} x{report['n_devices']}, peak {_fmt(report['peak_flops'])}FLOP/s "
           f"({report['peak_source']}), load avg {report['loadavg_start']} -> {report['loadavg_end']}", *lines]
    if report.get("vmap"):
        v = report["vmap"]
        out += ["", f"vmap over K models ({v['shape']}, N={_fmt(v['N'])}, {v['batch']}x{v['seq_len']} tokens per model "
                "per step; tokens/s summed over models):",
                "| K | mode | step ms | tokens/s | speed-up vs K separate steps |", "|---|---|---|---|---|"]
        out += [f"| {r['K']} | {r['mode']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x |"
                for r in v["rows"]]
    return "\n".join(out)


def run(args: argparse.Namespace) -> dict:
    import jax

    from scaling.accounting import PEAK_FLOPS, count_params, peak_flops_per_device

    device = jax.devices()[0]
    peak = peak_flops_per_device(device.device_kind, args.peak_flops)
    on_table = args.peak_flops or any(k.lower() in device.device_kind.lower() for k in PEAK_FLOPS)
    report = {
        "command": " ".join(["python -m scaling.bench", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device_kind": device.device_kind, "platform": device.platform, "n_devices": jax.device_count(),
        "cpu_count": os.cpu_count(), "host": platform.processor() or platform.machine(), "peak_flops": peak,
        "peak_source": "datasheet/override" if on_table else "measured XLA f32 matmul",
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__, "loadavg_start": os.getloadavg(),
        "rows": [],
    }
    shapes = [s for s in PRESETS[args.preset] if not args.shapes or s.name in args.shapes]
    torch_note = None
    if args.torch:
        try:
            import torch  # noqa: F401

            report["torch"] = torch.__version__
        except ImportError:
            torch_note = "torch not installed (pip install -e '.[bench]')"
            print(f"note: PyTorch column skipped: {torch_note}", file=sys.stderr)
    variants = list(VARIANTS[args.preset])
    if args.scan if args.scan is not None else args.preset == "gpu":
        # The same step with nn.scan over the layers: compile time no longer grows with depth; compare both rows.
        variants += [(f"{label}-scan", {**o, "scan_layers": True}) for label, o in VARIANTS[args.preset]]
    for shape in shapes:
        for label, overrides in variants:
            if args.attention:
                overrides = {**overrides, "attention": args.attention}
            try:
                row = bench_jax(shape, overrides, args.warmup, args.steps, peak)
            except Exception as e:  # noqa: BLE001 - one failing shape (OOM, missing cuDNN) must not lose the others
                if args.strict:
                    raise
                row = {"shape": shape.name, "error": f"{type(e).__name__}: {e}"}
            row["variant"] = label
            if args.torch and "error" not in row and label == VARIANTS[args.preset][0][0]:
                if torch_note:
                    row["torch_note"] = torch_note
                else:
                    row.update(bench_torch(shape, args.warmup, args.steps, args.torch_compile))
            report["rows"].append(row)
            print(format_table({**report, "rows": [row], "loadavg_end": os.getloadavg()}).splitlines()[-1], flush=True)
    if args.vmap:
        shape = VMAP_SHAPE[args.preset]
        report["vmap"] = {"shape": shape.name, "N": count_params(model_config(shape, {})).non_embedding,
                          "batch": shape.batch, "seq_len": shape.seq_len,
                          "rows": bench_vmap(shape, args.vmap, args.warmup, args.steps)}
    report["loadavg_end"] = os.getloadavg()
    return report


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scaling.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--shapes", nargs="*", help="only these shape names of the preset")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: cpu 5, gpu 20, tiny 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn", "einsum"], help="override every variant's attention")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                   help="time nanoGPT-style PyTorch on the same shapes (default: on for cpu/tiny)")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the PyTorch model (nanoGPT's default)")
    p.add_argument("--vmap", type=lambda s: [int(k) for k in s.split(",") if k], default=None,
                   help="K values for the vmap section, e.g. 4,8,16 (default 4,8,16; empty string: skip)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                   help="also time every variant with model.scan_layers=true (default: on for the gpu preset)")
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s for MFU")
    p.add_argument("--xla-flags", choices=["default", "none"], default="default",
                   help="gpu preset: add GPU_XLA_FLAGS to XLA_FLAGS (default) or leave XLA_FLAGS as is")
    p.add_argument("--strict", action="store_true", help="raise on the first failing shape instead of reporting it")
    p.add_argument("--json", help="also write the report as JSON to this path")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = {"cpu": 5, "gpu": 20, "tiny": 3}[args.preset]
    if args.torch is None:
        args.torch = args.preset != "gpu"
    if args.vmap is None:
        args.vmap = [4, 8, 16]
    if args.steps <= 0 or args.warmup < 0:
        p.error(f"--steps={args.steps} must be positive and --warmup={args.warmup} non-negative")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
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


if __name__ == "__main__":
    main()
