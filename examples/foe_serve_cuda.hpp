#pragma once
// foe_serve's door to the CUDA backend: declared here for the host translation unit
// (foe_serve.cpp, a plain C++ compiler), defined in foe_serve_cuda.cu (nvcc), so only that one
// file needs nvcc.

#include <memory>

#include "foe/model/model.hpp"

/// What a served model holds: `slots` sequences of at most `capacity` positions in a paged KV
/// cache of `pages` pages of `page_size` positions, and forwards of at most `max_batch_tokens`.
struct ServedModelShape {
    foe::index_t slots = 1;
    foe::index_t capacity = 0;
    foe::index_t page_size = 16;
    foe::index_t pages = 0;
    foe::index_t max_batch_tokens = 0;
};

/// A foe::cuda::CudaModel on the current GPU over a paged KV cache (the batch's block tables, as
/// the host model reads them); dense GEMMs by foe's tensor-core kernel when `foe_gemm`, else
/// cuBLASLt. Decode steps replay CUDA graphs.
[[nodiscard]] std::unique_ptr<foe::ModelInterface> make_cuda_served_model(std::shared_ptr<const foe::ModelWeights> weights,
                                                                          const ServedModelShape& shape, bool foe_gemm);
