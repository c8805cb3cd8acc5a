// foe_run's CUDA backend (see foe_run_cuda.hpp).
#include "foe_run_cuda.hpp"

#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/model.cuh"

std::unique_ptr<foe::ModelInterface> make_cuda_model(std::shared_ptr<const foe::ModelWeights> weights,
                                                     foe::index_t capacity, bool foe_gemm)
{
    foe::cuda::CudaModelOptions options;
    options.cache_capacity = capacity;
    options.max_batch_tokens = capacity;  // the prompt in one prefill
    if (foe_gemm) return std::make_unique<foe::cuda::CudaModel<foe::cuda::TcGemm>>(std::move(weights), options);
    return std::make_unique<foe::cuda::CudaModel<foe::cuda::LtGemm>>(std::move(weights), options);
}
