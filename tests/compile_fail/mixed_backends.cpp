// Compile-fail test (tests/CMakeLists.txt): a host FoE layer whose residual sync is an all-reduce
// over a device communicator must not compile, and the error must name the policy. DeviceComm
// stands for NcclComm (whose header needs nvcc): a Comm whose collectives are enqueued on a
// stream and read device memory. With FOE_COMPILE_FAIL_CONTROL the same layer over a host
// communicator is built instead, and must compile: the failure is the backend check's, nothing
// else's.
#include <span>

#include <foe/foe.hpp>

struct DeviceComm {
    using stream_type = void*;  // not comm::HostStream: a device communicator
    [[nodiscard]] int rank() const { return 0; }
    [[nodiscard]] int size() const { return 1; }
    void all_reduce_sum(std::span<float>, stream_type) {}
    void all_to_all_v(std::span<const float>, std::span<const foe::index_t>, std::span<float>,
                      std::span<const foe::index_t>, stream_type) {}
    void all_gather(std::span<const float>, std::span<float>, stream_type) {}
    [[nodiscard]] DeviceComm split(int, int) { return {}; }
};
static_assert(foe::comm::Comm<DeviceComm>);

#if defined(FOE_COMPILE_FAIL_CONTROL)
using SyncComm = foe::comm::SelfComm;
#else
using SyncComm = DeviceComm;
#endif

using Layer = foe::FoeLayer<foe::attention::GqaAttention<>,
                            foe::routing::Router<foe::routing::Softmax, foe::routing::PerGroupTopK>,
                            foe::experts::SwiGluExperts<>, foe::parallel::LocalExperts, foe::sync::AllReduceMean<SyncComm>>;

int main()
{
    const foe::ModelConfig config = foe::named_config("foe-tiny");
    const foe::ModelWeights weights = foe::random_weights(config, 1);
    Layer layer(config, foe::layer_weights(weights, 0));
    return static_cast<int>(layer.streams()) - 4;
}
