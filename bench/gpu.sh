#!/usr/bin/env bash
# The GPU run, from the repository root on a machine with a GPU: the engine tests, then the FULL benchmark
# suite (every case, full sizes, each in its own process), its figures included.
#
#   bash bench/gpu.sh                # engine tests + python -m bench (the full suite)
#   bash bench/gpu.sh --quick        # any `python -m bench` options are passed on (--quick, --only NAME, ...)
#
# Results go to bench/results/gpu-<model>/ (e.g. gpu-h200/; RESULTS=DIR to choose): gpu.{json,md,png},
# gpu-summary.png (gpu-quick.* with --quick), bench.txt (what the run printed), tests.txt, machine.txt.
# When OUT is set (a lent device machine returns only what is under $OUT), they are copied there as well.
# GPU_TESTS=0 skips the tests (GPU_TEST_WORKERS, default 8, and GPU_TEST_TIMEOUT, default 330 s, shape them),
# INSTALL=0 the editable install; BENCH_TIMEOUT (seconds, default 3000) bounds the benchmark run, which saves
# the cases that finished when it is cut.
set -uo pipefail
model=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | awk '{print tolower($2)}')
res="${RESULTS:-bench/results/gpu-${model:-unknown}}"
mkdir -p "$res"
stem=gpu
for a in "$@"; do [ "$a" = "--quick" ] && stem=gpu-quick; done
export PYTHONUNBUFFERED=1
if [ "${INSTALL:-1}" != 0 ]; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/jacobians-install.log 2>&1 || tail -5 /tmp/jacobians-install.log
fi
python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install -q matplotlib >>/tmp/jacobians-install.log 2>&1 \
  || echo "matplotlib not installable here: no figures"
{ nvidia-smi -L; python3 -c "import jax, jaxlib, numpy; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'numpy', numpy.__version__, jax.devices())"; } 2>&1 | tee "$res/machine.txt"
if [ "${GPU_TESTS:-1}" != 0 ]; then
  # The default suite (README's command, the slow multi-process tests left out), over GPU_TEST_WORKERS xdist
  # workers that share the GPU: no preallocation, so that each takes only what it uses.
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${GPU_TEST_TIMEOUT:-330}" python3 -m pytest -q -p no:cacheprovider \
    -o addopts=-ra -m 'not slow' -n "${GPU_TEST_WORKERS:-8}" tests 2>&1 | tee "$res/tests.txt" | tail -n 25
fi
# torch's rows share the GPU with JAX: JAX takes half of it, not its default three quarters.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
timeout "${BENCH_TIMEOUT:-3000}" python3 -m bench --out "$res" --name "$stem" "$@" 2>&1 | tee "$res/bench.txt" | tail -n 80
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "the benchmark ran past BENCH_TIMEOUT=${BENCH_TIMEOUT:-3000} s: $res/bench.txt has the cases that finished"
# Copied to $OUT unless they were written there (RESULTS=$OUT/... keeps a cut run's files too).
if [ -n "${OUT:-}" ] && [[ "$(cd "$res" && pwd)/" != "$(mkdir -p "$OUT" && cd "$OUT" && pwd)/"* ]]; then
  cp -r "$res" "$OUT/"
fi
exit "$rc"
