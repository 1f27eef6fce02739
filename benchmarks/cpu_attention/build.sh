#!/usr/bin/env bash
# Prototype of session 19 (BENCHMARKS.md): causal attention as XLA FFI custom calls on XLA's thread pool. Not part of
# the product. Two builds of attn_ffi.cc: libattn_native.so (the small GEMMs of small_gemm.h, no library) and
# libattn_mkl.so (MKL's sequential sgemm; MKL's wheel unpacked into /tmp/mkl, as benchmarks/mkl_ffi/build.sh does).
#   benchmarks/cpu_attention/build.sh
#   ATTN_KERNEL=native|mkl python benchmarks/cpu_attention/attn.py
#   (values, gradients and causality against the product's attention)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
inc=$("$py" -c "import jax.ffi; print(jax.ffi.include_dir())")
flags=(-O3 -march=native -std=c++17 -shared -fPIC -w -I"$inc")
g++ "${flags[@]}" "$here/attn_ffi.cc" -o "$here/libattn_native.so"
source "$here/../mkl_ffi/fetch_mkl.sh"
g++ "${flags[@]}" -DATTN_MKL "$here/attn_ffi.cc" -o "$here/libattn_mkl.so" \
  -L/tmp/mkl/lib -l:libmkl_rt.so.3 -Wl,-rpath,/tmp/mkl/lib
echo "built $here/libattn_native.so $here/libattn_mkl.so"
