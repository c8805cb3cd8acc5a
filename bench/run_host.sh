#!/usr/bin/env bash
# Runs foe's host benchmark suites, the cost-model projection and (with MPI) the measured bytes
# per rank, writes JSON under RESULTS and draws the PNG plots. Called by `cmake --build BUILD
# --target bench`; a few minutes on two cores.
#
#   bench/run_host.sh BUILD_DIR RESULTS_DIR
set -euo pipefail
build=${1:?usage: run_host.sh BUILD_DIR RESULTS_DIR}
results=${2:?usage: run_host.sh BUILD_DIR RESULTS_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$results"

for suite in kernels layers model; do
  echo "== bench_$suite"
  "$build/bench/bench_$suite" --benchmark_out="$results/host_$suite.json" --benchmark_out_format=json \
    --benchmark_counters_tabular=true --benchmark_min_time=0.2
done

if [ -x "$build/examples/foe_project" ]; then
  echo "== foe_project (cost model, foe-1b on 8xH100 nodes)"
  "$build/examples/foe_project" --json > "$results/projection_foe-1b_h100.json"
  "$build/examples/foe_project" --json --seq-len 2048 > "$results/projection_foe-1b_h100_seq2048.json"
fi

if [ -x "$build/examples/foe_serve" ]; then
  echo "== foe_serve --simulate (scheduler on the cost model's step times, foe-1b on 8 and 16 H100s)"
  "$build/examples/foe_serve" --simulate --json "$results/serving_sim_foe-1b_h100.json" > "$results/serving_sim_foe-1b_h100.txt"
  # The paper's regime: compute far from peak and a fixed cost per layer (chosen, see README).
  "$build/examples/foe_serve" --simulate --compute-tflops 20 --layer-overhead-ms 1 \
    --json "$results/serving_sim_foe-1b_h100_20tflops_1ms.json" > "$results/serving_sim_foe-1b_h100_20tflops_1ms.txt"
fi

if [ -x "$build/examples/foe_comm" ] && command -v mpirun > /dev/null; then
  mpi=(mpirun --oversubscribe)
  [ "$(id -u)" -eq 0 ] && mpi+=(--allow-run-as-root)
  for ranks in 2 4 8 16; do
    echo "== foe_comm on $ranks ranks (foe-1b, 2048 tokens, 8 ranks per node)"
    OMP_NUM_THREADS=1 "${mpi[@]}" -np "$ranks" "$build/examples/foe_comm" --config foe-1b --tokens 2048 \
      --ranks-per-node 8 --json > "$results/foe_comm_foe-1b_2048_G${ranks}_R8.json"
  done
fi

echo "== plots"
# Debian's python3-matplotlib (bash .ci/install-deps --bench) lives with /usr/bin/python3; another
# python3 first on PATH may lack it.
python=python3
if ! python3 -c "import matplotlib" 2> /dev/null && [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; fi
"$python" "$here/plot.py" "$results"
