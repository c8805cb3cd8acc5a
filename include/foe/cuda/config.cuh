#pragma once
// Portability and linkage of foe's CUDA kernels.
//
// Kernels are templates on their launch policy (a struct of constexpr values: the block size the
// kernel's __launch_bounds__ and its host launcher both read), instantiated in the user's
// translation units; being templates, a header may define them in any number of them. Two shared objects built
// for different architectures would otherwise export the same mangled kernel symbol and the
// dynamic linker would bind both to one of them (running sm_80 code on a device that needed the
// other image, or failing to find the image). As CCCL does (docs/cccl/development/visibility.rst),
// every __global__ template is hidden, and lives in an inline namespace that names the library
// version, so objects of two foe versions never share a kernel symbol either.

#include <cuda_runtime.h>

#include "foe/core/types.hpp"

#if defined(__GNUC__) || defined(__clang__)
#define FOE_KERNEL_VISIBILITY __attribute__((visibility("hidden")))
#else
#define FOE_KERNEL_VISIBILITY
#endif

/// Declares a foe kernel: `FOE_KERNEL(256) void name(...)` (the argument is __launch_bounds__).
#define FOE_KERNEL(max_threads) __global__ FOE_KERNEL_VISIBILITY __launch_bounds__(max_threads)

namespace foe::cuda {
inline namespace kernels_v0_1 {}
}  // namespace foe::cuda
