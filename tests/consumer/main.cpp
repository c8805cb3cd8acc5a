// A user's program: builds a tiny FoE model from random weights and generates a few tokens.
#include <foe/foe.hpp>

#include <cstdio>
#include <memory>

int main()
{
    const auto weights = std::make_shared<const foe::ModelWeights>(foe::random_weights(foe::named_config("foe-tiny"), 3));
    const auto model = foe::make_model(weights);
    const std::int32_t prompt[] = {5, 6, 7};
    const auto generated = model->generate(prompt, 4);
    std::printf("consumer generated %zu tokens\n", generated.size());
    return generated.size() == 4 ? 0 : 1;
}
