#include <cstdio>
#include <vector>

#include <foe/foe.hpp>

// An FoE layer with sigmoid routing: one template argument differs from the shipped HostFoeLayer.
using MyLayer = foe::FoeLayer<foe::attention::GqaAttention<>,
                              foe::routing::Router<foe::routing::Sigmoid, foe::routing::PerGroupTopK>,
                              foe::experts::SwiGluExperts<>, foe::parallel::LocalExperts, foe::sync::AllReduceMean<>>;

int main()
{
    foe::ModelConfig config = foe::named_config("foe-tiny");  // d 64, 8 heads, H 4 groups, E 16, k 4
    config.scoring_func = foe::ScoreFunction::sigmoid;       // random_weights then adds the router bias
    const foe::ModelWeights weights = foe::random_weights(config, /*seed=*/1);
    MyLayer layer(config, foe::layer_weights(weights, /*layer=*/0));

    const foe::index_t tokens = 5, d = config.hidden_size, groups = layer.streams();
    const std::vector<float> x(tokens * d, 0.5f);  // one input stream: the first layer broadcasts it
    std::vector<float> y(groups * tokens * d);     // one output stream per group
    layer.forward(foe::Batch::single(/*start=*/0, tokens), {x.data(), {1, tokens, d}}, {y.data(), {groups, tokens, d}});

    std::printf("token 0 uses experts");
    for (foe::index_t s = 0; s < layer.last_routing().slots_per_token; ++s) std::printf(" %d", layer.last_routing().expert(0, s));
    std::printf("; stream 0 starts %.4f\n", y[0]);
}
