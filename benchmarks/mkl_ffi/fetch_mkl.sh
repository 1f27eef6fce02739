# Sourced by the prototypes' build scripts (benchmarks/mkl_ffi/build.sh, benchmarks/cpu_attention/build.sh): MKL's
# wheel (229 MB, ~1 min) unpacked into /tmp/mkl once, for linking against /tmp/mkl/lib/libmkl_rt.so.3. Needs $py.
if [ ! -e /tmp/mkl/lib/libmkl_rt.so.3 ]; then
  "$py" -m pip download mkl --no-deps -d /tmp/mklwheel -q
  mkdir -p /tmp/mkl && (cd /tmp/mkl && unzip -q -o /tmp/mklwheel/mkl-*.whl 'mkl-*.data/data/lib/*' && mv mkl-*.data/data/lib .)
fi
