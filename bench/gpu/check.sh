#!/usr/bin/env bash
# The GPU check of foe's CUDA kernels, run once on a device machine (H200, CUDA 13, CMake, Ninja;
# no network). Builds only the CUDA targets for sm_90a, runs the kernel tests (every kernel against
# the host kernels) and the CUDA benchmark, and prints a summary table last. Under 8 minutes.
#
#   bash bench/gpu/prepare_carry.sh     # on the build machine: doctest and Google Benchmark into .carry/
#   bash bench/gpu/check.sh             # on the device machine, with .carry/ carried along
#
# The log goes to $OUT/check.log when OUT is set (else build-gpu/check.log), the test's own output
# to $OUT/test_cuda_kernels.log, benchmark JSON to $OUT/bench_cuda.json. Each test case runs in
# its own process, so a kernel that faults (a sticky CUDA error) cannot take the others with it.
# Without a GPU the tests report "no CUDA device: skipped" and pass.
set -u -o pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${FOE_GPU_BUILD_DIR:-$root/build-gpu}
out=${OUT:-$build}
mkdir -p "$out" "$build"
exec > >(tee "$out/check.log") 2>&1

declare -a summary=()
overall=0
budget=450  # seconds for the whole script: it must end inside 8 minutes whatever hangs
# step NAME TIMEOUT_S CMD...: runs a step under a time limit (cut to what is left of the budget)
# and records its status and time.
step() {
  local name=$1 limit=$2
  shift 2
  if ((SECONDS + limit > budget)); then limit=$((budget - SECONDS)); fi
  if ((limit < 5)); then
    summary+=("$(printf '%-62s %-16s' "$name" "SKIPPED (time)")")
    overall=1
    return 1
  fi
  echo
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local status=ok
  if ((rc == 124 || rc == 137)); then status="TIMEOUT"; elif ((rc != 0)); then status="FAILED (rc $rc)"; fi
  summary+=("$(printf '%-62s %-16s %5ss' "$name" "$status" $((SECONDS - t0)))")
  [[ $status == ok ]] || overall=1
  return $rc
}

echo "=== foe GPU check: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH=/usr/local/cuda/bin:$PATH; fi
nvcc --version 2>&1 | tail -2 || echo "nvcc: not found"
cmake --version | head -1
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"

carry=$root/.carry
bench=OFF
if [[ -f $carry/lib/x86_64-linux-gnu/cmake/benchmark/benchmarkConfig.cmake ]]; then
  bench=ON
  export LD_LIBRARY_PATH=$carry/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
doctest_dir=/usr/include
[[ -f $carry/include/doctest/doctest.h ]] && doctest_dir=$carry/include

step configure 180 cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DFOE_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a -DFOE_ENABLE_BLAS=OFF -DFOE_ENABLE_MPI=OFF \
  -DFOE_BUILD_EXAMPLES=OFF -DFOE_BUILD_BENCHMARKS=$bench -DCMAKE_PREFIX_PATH="$carry" \
  -DFOE_DOCTEST_INCLUDE_DIR="$doctest_dir"
configured=$?

if ((configured == 0)); then
  step "build test_cuda_kernels" 300 ninja -C "$build" -j16 test_cuda_kernels
  built_test=$?
  built_bench=1
  if [[ $bench == ON ]]; then
    step "build bench_cuda" 240 ninja -C "$build" -j16 bench_cuda
    built_bench=$?
  fi
  if ((built_test == 0)); then
    bin=$build/tests/test_cuda_kernels
    : >"$out/test_cuda_kernels.log"
    mapfile -t cases < <("$bin" --list-test-cases 2>/dev/null | grep '^cuda: ')
    echo "test cases: ${#cases[@]}"
    ((${#cases[@]} > 0)) || { summary+=("no test cases listed"); overall=1; }
    for name in "${cases[@]}"; do
      # doctest's filter splits at commas: select the case by its name up to the first comma.
      step "${name:0:60}" 90 bash -c 'set -o pipefail; "$1" --test-case="$2" --duration=true 2>&1 | tee -a "$3"' _ \
        "$bin" "${name%%,*}*" "$out/test_cuda_kernels.log"
    done
    # A test that skipped everything checked nothing: say so, and fail where a GPU is visible.
    if grep -q "no CUDA device: skipped" "$out/test_cuda_kernels.log"; then
      if nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
        summary+=("$(printf '%-62s %-16s' "CUDA device" "NOT SEEN by CUDA: tests skipped")"); overall=1
      else
        summary+=("$(printf '%-62s %-16s' "CUDA device" "none: tests skipped")")
      fi
    fi
  fi
  if ((built_bench == 0)); then
    step "run bench_cuda" 150 "$build/bench/bench_cuda" --benchmark_min_time=0.1 \
      --benchmark_out="$out/bench_cuda.json" --benchmark_out_format=json
  fi
fi

echo
echo "=== summary ($(date -u +%H:%M:%S), total ${SECONDS}s; log: $out/check.log)"
printf '%s\n' "${summary[@]}"
echo "overall: $([[ $overall == 0 ]] && echo PASS || echo FAIL)"
exit $overall
