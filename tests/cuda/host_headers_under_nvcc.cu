// Compile check: every host header of foe also compiles as part of a CUDA translation unit
// (nvcc with its host compiler), so a user's .cu file can include foe/foe.hpp next to the CUDA
// parts. Nothing here needs a GPU to run: it builds a tiny model on the host and prints a logit.

#include <cstdio>
#include <memory>

#include "foe/foe.hpp"

// The 16-bit types are usable in device code (FOE_HOST_DEVICE conversions).
__global__ void round_trip(const float* in, foe::bfloat16* bf, foe::float16* hf, float* out)
{
    const unsigned i = threadIdx.x;
    bf[i] = foe::bfloat16(in[i]);
    hf[i] = foe::float16(in[i]);
    out[i] = static_cast<float>(bf[i]) + static_cast<float>(hf[i]);
}

int main()
{
    const auto weights = std::make_shared<const foe::ModelWeights>(foe::random_weights(foe::named_config("foe-tiny"), 1));
    const auto model = foe::make_model(weights);
    const std::int32_t prompt[] = {1, 2, 3};
    const auto logits = model->prefill(prompt);
    std::printf("host model under nvcc: logit[0] = %f\n", logits.values()[0]);
    return 0;
}
