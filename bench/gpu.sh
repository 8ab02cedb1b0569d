#!/usr/bin/env bash
# The device check: the test suite's engine tests and `python -m bench --quick` on a GPU machine
# (run from the repository root; writes into $OUT, or bench/results/gpu when OUT is unset).
set -uo pipefail
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || tail -5 "$out/install.log"
{ nvidia-smi -L; python3 -c "import jax, jaxlib, numpy; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'numpy', numpy.__version__, jax.devices())"; } | tee "$out/machine.txt"
timeout 330 python3 -m pytest -q -p no:cacheprovider -x tests/test_jacobian.py tests/test_hessian.py tests/test_pipeline.py \
  tests/test_batch.py tests/test_siblings.py tests/test_detection.py 2>&1 | tee "$out/tests.txt" | tail -n 15
timeout 200 python3 -m bench --quick --no-isolate --out "$out" --name gpu-quick 2>&1 | tee "$out/bench-quick.txt" | tail -n 45
