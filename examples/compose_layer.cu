#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include <foe/foe.cuh>
#include <foe/foe.hpp>

// The same FoE layer as compose_layer.cpp, from device policies: it runs in bf16 on a CUDA stream.
using GpuLayer =
    foe::FoeLayer<foe::attention::CudaGqaAttention<foe::cuda::TcGemm>,
                  foe::routing::CudaRouter<foe::routing::Sigmoid, foe::routing::PerGroupTopK, foe::cuda::TcGemm>,
                  foe::experts::CudaSwiGluExperts<foe::cuda::TcGemm>, foe::parallel::CudaLocalExperts,
                  foe::sync::AllReduceMean<foe::comm::CudaSelfComm>>;

int main()
{
    if (foe::cuda::cuda_device_count() == 0) {
        std::puts("compose_layer_cuda: no CUDA device, nothing to run");
        return 0;
    }
    foe::ModelConfig config = foe::named_config("foe-tiny");  // d 64, 8 heads, H 4 groups, E 16, k 4
    config.scoring_func = foe::ScoreFunction::sigmoid;
    // Weights rounded to bf16 as the GPU holds them: the two layers differ only in their activations.
    const foe::ModelWeights weights = foe::stored_as(foe::random_weights(config, /*seed=*/1), foe::DType::bf16);
    const foe::index_t tokens = 5, d = config.hidden_size;
    foe::LayerOptions options;
    options.max_tokens = tokens;  // a GPU layer plans its device memory for this many tokens
    GpuLayer gpu(config, foe::layer_weights(weights, /*layer=*/0), options);
    foe::HostFoeLayer<foe::routing::Sigmoid> host(config, foe::layer_weights(weights, /*layer=*/0), options);
    const foe::index_t groups = gpu.streams();

    // A random embedding, rounded to bf16 for both layers; one output stream per group.
    std::mt19937 rng(2);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    std::vector<foe::bfloat16> x16(tokens * d);
    std::vector<float> x(tokens * d), y(groups * tokens * d);
    for (std::size_t i = 0; i < x.size(); ++i) {
        x16[i] = foe::bfloat16(uniform(rng));
        x[i] = static_cast<float>(x16[i]);
    }
    const foe::Batch batch = foe::Batch::single(/*start=*/0, tokens);
    host.forward(batch, {x.data(), {1, tokens, d}}, {y.data(), {groups, tokens, d}});

    // The batch's arrays as the kernels read them, the layer's scratch, the input and the output on the device.
    const foe::cuda::BatchLayout layout(/*max_sequences=*/1, tokens);
    std::vector<std::int32_t> arrays(layout.size());
    layout.fill(batch, std::vector<std::int32_t>(tokens), arrays);  // token ids: a layer reads none
    const auto arrays_dev = foe::cuda::upload(arrays);
    foe::cuda::DeviceBuffer<unsigned char> scratch_dev(gpu.scratch_bytes());
    foe::cuda::Scratch scratch(scratch_dev.data(), scratch_dev.size());
    const auto x_dev = foe::cuda::upload(x16);
    foe::cuda::DeviceBuffer<foe::bfloat16> y_dev(y.size());
    gpu.forward(layout.view(arrays_dev.data(), batch), {x_dev.data(), {1, tokens, d}},
                {y_dev.data(), {groups, tokens, d}}, foe::cuda::DeviceContext{/*stream=*/nullptr, &scratch});
    const std::vector<foe::bfloat16> y16 = foe::cuda::download(y_dev);

    double diff = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
        diff = std::max(diff, std::abs(static_cast<double>(static_cast<float>(y16[i]) - y[i])));
        scale = std::max(scale, std::abs(static_cast<double>(y[i])));
    }
    std::printf("GPU layer against the host layer: max |difference| %.4f, largest |output| %.4f\n", diff, scale);
}
