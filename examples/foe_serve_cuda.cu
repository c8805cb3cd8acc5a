// foe_serve's CUDA backend (see foe_serve_cuda.hpp).
#include "foe_serve_cuda.hpp"

#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/model.cuh"

std::unique_ptr<foe::ModelInterface> make_cuda_served_model(std::shared_ptr<const foe::ModelWeights> weights,
                                                            const ServedModelShape& shape, bool foe_gemm)
{
    foe::cuda::CudaModelOptions options;
    options.cache_slots = shape.slots;
    options.cache_capacity = shape.capacity;
    options.page_size = shape.page_size;
    options.cache_pages = shape.pages;
    options.max_batch_tokens = shape.max_batch_tokens;
    options.max_sequences = shape.slots;
    if (foe_gemm) return std::make_unique<foe::cuda::CudaModel<foe::cuda::TcGemm>>(std::move(weights), options);
    return std::make_unique<foe::cuda::CudaModel<foe::cuda::LtGemm>>(std::move(weights), options);
}
