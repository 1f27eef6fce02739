"""Interleaved A/B of training steps: each variant in its own process with the same threads, all built first, then
taking turns one call at a time (never two at once), so a slow spell of the VM lands on every variant alike
(BENCHMARKS.md, session 17). `python -m scaling.bench --repeats` alternates whole processes minutes apart; this
alternates calls seconds apart, for A/B tests of a few percent.

    python benchmarks/interleaved.py VARIANTS.json [ROUNDS]

VARIANTS.json: a list of {"name", "impl": "jax" | "torch", "shape": a nanogpt preset shape name, "overrides":
ModelConfig fields (jax), "repo": a checkout to import `scaling` from (default: this one; it needs
`scaling.bench.runner.step_setup` and `reference_dims`, i.e. session 17 or later), "xla_flags": XLA_FLAGS for
that process, "grad_accum": the same tokens in that many microbatches (jax; session 18 or later)}. A jax call is
one chained call of train.steps_per_call steps (as the trainer runs); a torch call is as many eager steps. Prints
per variant the median over rounds of (steps / call wall time) as tokens/s, the range, CPU cores used (process CPU
time / wall), the last loss, and the 1-minute load average before and after.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve(spec: dict) -> None:
    """Worker: build the step, print READY, then one timed call per "go" line on stdin."""
    sys.path.insert(0, spec.get("repo", HERE))
    from scaling.bench import runner
    from scaling.config import TrainConfig

    shape = next(s for s in runner.PRESETS["nanogpt"] if s.name == spec["shape"])
    P = TrainConfig().steps_per_call
    t0 = time.perf_counter()
    if spec["impl"] == "jax":
        import jax

        # the step as scaling.bench times it (the checkout's own runner.step_setup)
        _, train_step, state, lower_args, run_call = runner.step_setup(shape, spec.get("overrides", {}), P,
                                                                          grad_accum=spec.get("grad_accum", 1))
        compiled = train_step.lower(*lower_args).compile()
        calls = [0]

        def call() -> float:
            nonlocal state
            state, metrics = run_call(compiled, state, calls[0])
            jax.block_until_ready((state, metrics))
            calls[0] += 1
            return float(metrics["train_loss"][P - 1] if P > 1 else metrics["train_loss"])
    else:
        import torch

        from scaling.bench import references

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        step = references.torch_step(**runner.reference_dims(shape), compile_model=spec["impl"] == "torch-compile")
        step()

        def call() -> float:
            for _ in range(P):
                loss = step()
            return loss
    print("READY " + json.dumps({"P": P, "build_s": time.perf_counter() - t0, "tokens": shape.batch * shape.seq_len}),
          flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        wall0, cpu0 = time.perf_counter(), time.process_time()
        loss = call()
        print(json.dumps({"s": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0, "loss": loss}),
              flush=True)


def main(variants: list[dict], rounds: int) -> None:
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    print("load before", os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S"), flush=True)
    procs = []
    for v in variants:  # built one after another: compilations do not overlap
        env = {**os.environ, "XLA_FLAGS": v.get("xla_flags", ""), "OMP_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads}
        p = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(v)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
        line = p.stdout.readline()
        if not line.startswith("READY "):
            raise SystemExit(f"{v['name']}: the worker died while building its step (its stderr is above)")
        procs.append((v, p, json.loads(line[6:])))
        print(v["name"], "built in", f"{procs[-1][2]['build_s']:.1f} s", flush=True)

    def call(p) -> dict:
        p.stdin.write("go\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    for _, p, _ in procs:
        call(p)  # warm-up call
    samples: dict[str, list[dict]] = {v["name"]: [] for v in variants}
    for r in range(rounds):
        for v, p, _ in (procs if r % 2 == 0 else procs[::-1]):  # alternate the order: no variant always goes first
            samples[v["name"]].append(call(p))
    for _, p, _ in procs:
        p.stdin.write("quit\n")
        p.stdin.flush()
        p.wait()
    base = None
    for v, _, info in procs:
        tps = [info["tokens"] * info["P"] / o["s"] for o in samples[v["name"]]]
        med = statistics.median(tps)
        base = base or med
        print(f"{v['name']:>24s} {med:8,.0f} tokens/s ({min(tps):,.0f}-{max(tps):,.0f})  x first {med / base:.3f}  "
              f"cores {statistics.median(o['cpu'] / o['s'] for o in samples[v['name']]):.2f}  "
              f"loss {samples[v['name']][-1]['loss']:.4f}", flush=True)
    print("load after", os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S"), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        with open(sys.argv[1]) as f:
            main(json.load(f), int(sys.argv[2]) if len(sys.argv) > 2 else 6)
