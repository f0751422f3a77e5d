#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md ("GPU") in two device calls of under 10 minutes each.
#
#   bash benchmarks/gpu_session.sh 1 OUTDIR   # 256² throughput: 1000-step fit, B=16/64, bf16
#   bash benchmarks/gpu_session.sh 2 OUTDIR   # fit_speed (in-loop ratio) and the GPU test subset
#
# Run from the repository root on a machine with a GPU and jax[cuda]; every
# step has its own time limit, and JSON/logs go to OUTDIR. Not in CI.
set -u -o pipefail
part=${1:?part 1 or 2}; out=${2:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
quiet() { grep -v '^[IW][0-9]'; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax, diffrax; print('jax', jax.__version__, 'flax', flax.__version__, 'diffrax', diffrax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
tp() { python3 benchmarks/fit_throughput.py --size=256 --distinct=8 "$@" 2>&1 | quiet; }
if [ "$part" = 1 ]; then
  timeout 150 bash -c "$(declare -f tp quiet); tp --batches=1 --steps=1000 --json_out=$out/b1_s1000.json" | tail -3
  timeout 170 bash -c "$(declare -f tp quiet); tp --batches=16,64 --steps=30 --json_out=$out/b16_64.json" | tail -4
  timeout 150 bash -c "$(declare -f tp quiet); tp --batches=16 --steps=50 --compute_dtype=bfloat16 --json_out=$out/b16_bf16.json" | tail -3
elif [ "$part" = 2 ]; then
  timeout 220 python3 benchmarks/fit_speed.py --sizes=128,256 --batches=1 --inloop_sizes=128 \
      --json_out="$out/fit_speed.json" 2>&1 | quiet | tail -6
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_flow.py \
      tests/test_fit.py 2>&1 | tail -4 | tee "$out/tests.txt"
else
  echo "part must be 1 or 2" >&2; exit 2
fi
