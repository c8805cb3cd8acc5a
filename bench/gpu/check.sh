#!/usr/bin/env bash
# The GPU check of foe's CUDA backend, run once on a device machine (H200, CUDA 13, CMake, Ninja;
# no network). Builds the CUDA targets for sm_90a, runs every CUDA test case (kernels, attention,
# GEMMs, layers and model against the host library, NCCL on one rank), foe_run --backend cuda,
# and the CUDA benchmarks, and prints a summary table last. Under 8 minutes.
#
#   bash bench/gpu/prepare_carry.sh     # on the build machine: doctest and Google Benchmark into .carry/
#   bash bench/gpu/check.sh             # on the device machine, with .carry/ carried along
#
# The log goes to $OUT/check.log when OUT is set (else build-gpu/check.log), the tests' own output
# to $OUT/cuda_tests.log, benchmark JSON to $OUT/bench_cuda*.json. Each test case runs in
# its own process, so a kernel that faults (a sticky CUDA error) cannot take the others with it.
# Without a GPU the tests report "no CUDA device: skipped" and pass.
set -u -o pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${FOE_GPU_BUILD_DIR:-$root/build-gpu}
out=${OUT:-$build}
mkdir -p "$out" "$build"
exec > >(tee "$out/check.log") 2>&1
tee_pid=$!
# The summary is printed last: wait for tee to write it to the log before the script ends.
finish() {
  local rc=$?
  exec 1>&- 2>&-
  wait "$tee_pid" 2>/dev/null
  exit "$rc"
}
trap finish EXIT
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

declare -a summary=()
overall=0
optional=0  # set around steps whose skip for lack of time is no failure (the benchmarks)
budget=450  # seconds for the whole script: it must end inside 8 minutes whatever hangs
# step NAME TIMEOUT_S CMD...: runs a step under a time limit (cut to what is left of the budget)
# and records its status and time.
step() {
  local name=$1 limit=$2
  shift 2
  if ((SECONDS + limit > budget)); then limit=$((budget - SECONDS)); fi
  if ((limit < 5)); then
    summary+=("$(printf '%-62s %-16s' "$name" "SKIPPED (time)")")
    ((optional)) || overall=1
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
echo "host compiler: $(c++ --version 2>&1 | head -1)"
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
if [[ ! -f $doctest_dir/doctest/doctest.h ]]; then
  # Without it every CUDA test fails to compile, which would read as 40 failed kernels.
  echo "check.sh: doctest/doctest.h is neither in $carry/include nor in /usr/include: run"
  echo "  bash bench/gpu/prepare_carry.sh  on the build machine and carry .carry/ along (carry: [\".carry\"])"
  exit 2
fi

# NCCL: in the CUDA toolkit, or else the nvidia-nccl wheel of the image's PyTorch.
nccl_root=
if [[ ! -f /usr/local/cuda/include/nccl.h ]]; then
  nccl_root=$(python3 -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null || true)
  if [[ -n $nccl_root ]]; then
    echo "NCCL from $nccl_root"
    export LD_LIBRARY_PATH=$nccl_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  else
    echo "NCCL: not found (the NcclComm test is not built)"
  fi
fi
nccl_header=${nccl_root:-/usr/local/cuda}/include/nccl.h
[[ -f $nccl_header ]] && echo "NCCL $(sed -n 's/^#define NCCL_\(MAJOR\|MINOR\|PATCH\) *\([0-9]*\).*/\2/p' "$nccl_header" | paste -sd.)"

step configure 150 cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DFOE_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a -DFOE_ENABLE_BLAS=OFF -DFOE_ENABLE_MPI=OFF \
  -DFOE_BUILD_EXAMPLES=ON -DFOE_BUILD_BENCHMARKS=$bench -DCMAKE_PREFIX_PATH="$carry" \
  -DFOE_DOCTEST_INCLUDE_DIR="$doctest_dir" -DCMAKE_CUDA_FLAGS=-lineinfo ${nccl_root:+-DNCCL_ROOT="$nccl_root"}
configured=$?

if ((configured == 0)); then
  # One ninja for everything: the CUDA translation units build in parallel on the 16 cores.
  targets=(foe_cuda_tests foe_run foe_serve)
  [[ $bench == ON ]] && targets+=(bench_cuda bench_cuda_attention bench_cuda_model)
  step "build ${targets[*]}" 300 ninja -C "$build" -j16 -k 0 "${targets[@]}"
  : >"$out/cuda_tests.log"
  for bin in "$build"/tests/test_cuda_* "$build"/tests/test_nccl_comm; do
    [[ -x $bin ]] || continue
    mapfile -t cases < <("$bin" --list-test-cases 2>/dev/null | grep -E '^(cuda|nccl)')
    echo "$(basename "$bin"): ${#cases[@]} test cases"
    ((${#cases[@]} > 0)) || { summary+=("$(basename "$bin"): no test cases listed"); overall=1; }
    for name in "${cases[@]}"; do
      # Each case in its own process (a sticky CUDA error cannot take the others with it);
      # doctest's filter splits at commas: select the case by its name up to the first comma.
      step "${name:0:60}" 90 bash -c 'set -o pipefail; "$1" --test-case="$2" --duration=true 2>&1 | tee -a "$3"' _ \
        "$bin" "${name%%,*}*" "$out/cuda_tests.log"
    done
  done
  # A test that skipped everything checked nothing: say so, and fail where a GPU is visible.
  if grep -q "no CUDA device: skipped" "$out/cuda_tests.log"; then
    if nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
      summary+=("$(printf '%-62s %-16s' "CUDA device" "NOT SEEN by CUDA: tests skipped")"); overall=1
    else
      summary+=("$(printf '%-62s %-16s' "CUDA device" "none: tests skipped")")
    fi
  fi
  # foe_run --backend cuda on a random tiny model, next to the host backend (bf16 vs fp32: the
  # generated tokens may differ late in the sequence; both must run).
  if [[ -x $build/examples/foe_run ]]; then
    step "foe_run --init foe-small" 60 "$build/examples/foe_run" --init foe-small --out "$build/foe-small" --seed 1
    step "foe_run --backend host" 60 "$build/examples/foe_run" --model "$build/foe-small" --tokens 1,2,3,4,5 --max-new-tokens 8
    step "foe_run --backend cuda" 60 "$build/examples/foe_run" --model "$build/foe-small" --backend cuda --tokens 1,2,3,4,5 --max-new-tokens 8
    step "foe_run --backend cuda --gemm foe" 60 "$build/examples/foe_run" --model "$build/foe-small" --backend cuda --gemm foe --tokens 1,2,3,4,5 --max-new-tokens 8
  fi
  # Continuous batching over the paged KV cache on the GPU: a seeded trace on foe-small and
  # moe-small (TTFT, TBT, throughput side by side), written as JSON.
  if [[ -x $build/examples/foe_serve ]]; then
    step "foe_serve --backend cuda" 90 "$build/examples/foe_serve" --config foe-small --backend cuda --requests 32 \
      --rate 20 --seed 3 --json "$out/serve_cuda_foe-small.json"
  fi
  # compute-sanitizer memcheck on the kernels most likely to read out of bounds, while time is
  # left (built with -lineinfo, so a report names the source line).
  if command -v compute-sanitizer >/dev/null && ((SECONDS + 90 <= budget)); then
    declare -a checks=(
      "test_cuda_attention|cuda: attention's decode path (split-KV)*"
      "test_cuda_gemm|cuda: grouped_swiglu captured in a CUDA graph*"
      "test_cuda_model|cuda: results are bit-identical run to run*"
    )
    for c in "${checks[@]}"; do
      bin=$build/tests/${c%%|*}
      [[ -x $bin ]] || continue
      optional=1 step "memcheck ${c##*|}" 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$bin" --test-case="${c##*|}"
    done
  fi
  optional=1  # a benchmark skipped for lack of time is no failure
  for b in bench_cuda bench_cuda_attention bench_cuda_model; do
    [[ -x $build/bench/$b ]] || continue
    step "run $b" 120 "$build/bench/$b" --benchmark_min_time=0.1 \
      --benchmark_out="$out/$b.json" --benchmark_out_format=json
  done
  optional=0
fi

echo
echo "=== summary ($(date -u +%H:%M:%S), total ${SECONDS}s; log: $out/check.log)"
printf '%s\n' "${summary[@]}"
echo "overall: $([[ $overall == 0 ]] && echo PASS || echo FAIL)"
exit $overall
