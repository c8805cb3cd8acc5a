// Compile-fail test (tests/CMakeLists.txt, CUDA builds): a GPU FoE layer given the host router
// must not compile, and the error must name the policy: the device attention makes it a CUDA
// layer, and a host router would read device memory as host views. With
// FOE_COMPILE_FAIL_CONTROL the same layer takes the device router instead, and must compile: the
// failure is the backend check's, nothing else's.
#include <foe/foe.cuh>
#include <foe/foe.hpp>

// The router is spelled in place (not through an alias) so that the error names its type.
#if defined(FOE_COMPILE_FAIL_CONTROL)
using Layer = foe::FoeLayer<foe::attention::CudaGqaAttention<>,
                            foe::routing::CudaRouter<foe::routing::Softmax, foe::routing::PerGroupTopK>,
                            foe::experts::CudaSwiGluExperts<>, foe::parallel::CudaLocalExperts,
                            foe::sync::AllReduceMean<foe::comm::CudaSelfComm>>;
#else
using Layer = foe::FoeLayer<foe::attention::CudaGqaAttention<>,
                            foe::routing::Router<foe::routing::Softmax, foe::routing::PerGroupTopK>,
                            foe::experts::CudaSwiGluExperts<>, foe::parallel::CudaLocalExperts,
                            foe::sync::AllReduceMean<foe::comm::CudaSelfComm>>;
#endif

int main()
{
    const foe::ModelConfig config = foe::named_config("foe-tiny");
    const foe::ModelWeights weights = foe::random_weights(config, 1);
    foe::LayerOptions options;
    options.max_tokens = 8;
    Layer layer(config, foe::layer_weights(weights, 0), options);
    return static_cast<int>(layer.streams()) - 4;
}
