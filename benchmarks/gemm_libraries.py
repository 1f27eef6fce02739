"""The d384-L6-T256 step's float32 weight GEMMs in XLA:CPU (jax), PyTorch (MKL) and NumPy (OpenBLAS), each library in
its own process with the same threads, back to back (BENCHMARKS.md, session 18).

    python benchmarks/gemm_libraries.py            # 2 threads each; XLA_FLAGS from the environment go to the jax one

Shapes [M, K] x [K, N] of a 16 x 256-token batch at d384: the qkv and fc forward (K = 384), the mlp projection
forward (K = 1536), and two weight-gradient forms (contracting over the 4096 tokens). Each line: the median of 5
timings of 20 calls, as GFLOP/s (2 M K N per call). jax dispatches the 20 calls asynchronously, one dot per call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

SHAPES = [(4096, 384, 1152), (4096, 384, 1536), (4096, 1536, 384), (384, 4096, 1536), (1536, 4096, 384)]


def measure(lib: str) -> None:
    if lib == "jax":
        import jax

        matmul = jax.jit(lambda a, b: a @ b)
        make = lambda M, K, N: (jax.random.normal(jax.random.key(0), (M, K)),  # noqa: E731
                                jax.random.normal(jax.random.key(1), (K, N)))
        done = jax.block_until_ready
    elif lib == "torch":
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        matmul = lambda a, b: a @ b  # noqa: E731
        make = lambda M, K, N: (torch.randn(M, K), torch.randn(K, N))  # noqa: E731
        done = lambda c: c  # noqa: E731
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        matmul = lambda a, b: a @ b  # noqa: E731
        make = lambda M, K, N: (rng.standard_normal((M, K), np.float32),  # noqa: E731
                                rng.standard_normal((K, N), np.float32))
        done = lambda c: c  # noqa: E731
    for M, K, N in SHAPES:
        a, b = make(M, K, N)
        for _ in range(3):
            done(matmul(a, b))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                c = matmul(a, b)
            done(c)
            times.append(time.perf_counter() - t0)
        seconds = sorted(times)[2]
        print(f"{lib:>6s} {M:5d}x{K:5d}x{N:5d}: {20 * 2 * M * K * N / seconds / 1e9:6.0f} GFLOP/s", flush=True)


def main() -> None:
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    print("load before", os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S"), flush=True)
    for lib in ("jax", "torch", "numpy"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        subprocess.run([sys.executable, __file__, "--measure", lib], env=env, check=True)
    print("load after", os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S"), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        measure(sys.argv[2])
    else:
        main()
