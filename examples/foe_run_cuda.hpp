#pragma once
// foe_run's door to the CUDA backend: declared here for the host translation unit (foe_run.cpp,
// a plain C++ compiler), defined in foe_run_cuda.cu (nvcc), so only that one file needs nvcc.

#include <memory>

#include "foe/model/model.hpp"

/// A foe::cuda::CudaModel on the current GPU for one sequence of up to `capacity` positions;
/// dense GEMMs by foe's tensor-core kernel when `foe_gemm`, else cuBLASLt.
[[nodiscard]] std::unique_ptr<foe::ModelInterface> make_cuda_model(std::shared_ptr<const foe::ModelWeights> weights,
                                                                   foe::index_t capacity, bool foe_gemm);
