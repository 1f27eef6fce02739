#!/usr/bin/env bash
# Prototype of session 18 (BENCHMARKS.md): an XLA FFI custom call into MKL's cblas_sgemm. Not part of the product.
#   benchmarks/mkl_ffi/build.sh                 # ~1 min: MKL's wheel (229 MB) unpacked into /tmp/mkl, the .so built here
#   MKL_THREADING_LAYER=GNU python benchmarks/mkl_ffi/mklmm.py   # checks values and gradients against XLA's matmul
#   MKL_FFI=pool MKL_THREADING_LAYER=SEQUENTIAL python benchmarks/mkl_ffi/mklmm.py [--bench]   # the pool variant
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
source "$here/fetch_mkl.sh"
inc=$("$py" -c "import jax.ffi; print(jax.ffi.include_dir())")
for src in gemm_ffi gemm_pool; do  # gemm_pool (session 19): MKL sequential on XLA's thread pool
  g++ -O2 -std=c++17 -shared -fPIC -w -I"$inc" "$here/$src.cc" -o "$here/lib$src.so" \
    -L/tmp/mkl/lib -l:libmkl_rt.so.3 -Wl,-rpath,/tmp/mkl/lib
done
echo "built $here/libgemm_ffi.so $here/libgemm_pool.so"
