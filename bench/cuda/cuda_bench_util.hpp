#pragma once
// Helpers shared by foe's CUDA benchmark suites: random bf16 device data, CUDA-event timing
// (manual time), the no-device skip and a TFLOP/s counter.

#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "foe/core/half.hpp"
#include "foe/cuda/check.cuh"

namespace foe::cuda::bench {

/// A device buffer of n bf16 values uniform in [-scale, scale).
inline DeviceBuffer<bfloat16> random_device(std::size_t n, std::uint64_t seed, float scale)
{
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> d(-scale, scale);
    std::vector<bfloat16> h(n);
    for (auto& v : h) v = bfloat16(d(rng));
    return upload(h);
}

/// Times fn() with CUDA events around it on the default stream, one call per Google Benchmark
/// iteration, after one untimed warm-up call (module loading, first-call heuristics); sets each
/// iteration's manual time and returns the mean seconds per call (rates use it, not the CPU time
/// Google Benchmark's rate counters divide by).
template <class Fn>
double time_with_events(benchmark::State& state, Fn&& fn)
{
    cudaEvent_t start{}, stop{};
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
    fn();
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    double total = 0.0;
    std::int64_t iterations = 0;
    for (auto _ : state) {
        check(cudaEventRecord(start, nullptr), "cudaEventRecord");
        fn();
        check(cudaEventRecord(stop, nullptr), "cudaEventRecord");
        check(cudaEventSynchronize(stop), "cudaEventSynchronize");
        float ms = 0.0f;
        check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
        state.SetIterationTime(static_cast<double>(ms) * 1e-3);
        total += static_cast<double>(ms) * 1e-3;
        ++iterations;
    }
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
    return iterations > 0 ? total / static_cast<double>(iterations) : 0.0;
}

/// True (and the benchmark marked skipped) when there is no CUDA device.
inline bool skip_without_device(benchmark::State& state)
{
    if (cuda_device_count() > 0) return false;
    state.SkipWithError("no CUDA device: skipped");
    for (auto _ : state) {
    }
    return true;
}

inline void set_tflops(benchmark::State& state, double flops, double seconds)
{
    state.counters["TFLOP/s"] = seconds > 0.0 ? flops * 1e-12 / seconds : 0.0;
}

}  // namespace foe::cuda::bench
