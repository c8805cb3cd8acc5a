#pragma once
// Index type and small portability helpers shared by every header.

#include <cstddef>
#include <cstdint>

namespace foe {

/// Signed index for sizes and loop counters: negative values in a config are caught by
/// validation instead of wrapping around, and loops mix with differences without casts.
using index_t = std::int64_t;

}  // namespace foe

// FOE_HOST_DEVICE marks functions usable from CUDA kernels; plain C++ sees nothing.
#if defined(__CUDACC__)
#define FOE_HOST_DEVICE __host__ __device__
#else
#define FOE_HOST_DEVICE
#endif

// OpenMP loops through _Pragma so that a build without -fopenmp neither warns about unknown
// pragmas nor changes behaviour: every loop marked this way is a loop of independent iterations
// whose results do not depend on the number of threads.
#if defined(_OPENMP)
#define FOE_OMP_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#define FOE_OMP_PARALLEL_FOR_CYCLIC _Pragma("omp parallel for schedule(static, 1)")
#else
#define FOE_OMP_PARALLEL_FOR
#define FOE_OMP_PARALLEL_FOR_CYCLIC
#endif
