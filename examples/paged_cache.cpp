#include <cstdio>
#include <memory>
#include <vector>

#include <foe/foe.hpp>
#include <foe/serve/block_manager.hpp>

// A model over a paged KV cache: the engine (here foe's BlockManager) owns the block tables and
// hands them to each forward; two sequences share one pool of pages.
int main()
{
    auto weights = std::make_shared<const foe::ModelWeights>(foe::random_weights(foe::named_config("foe-tiny"), /*seed=*/1));
    foe::ModelOptions options;
    options.cache_slots = 8;      // sequences at once
    options.cache_capacity = 64;  // positions one sequence may reach
    options.page_size = 16;       // P
    options.cache_pages = 24;     // the pool: 24 pages of 16 positions, shared by the 8 slots
    auto model = foe::make_model<foe::gemm::Default, foe::attention::PagedKvCache>(weights, options);
    foe::serve::BlockManager pages(/*pages=*/24, /*page_size=*/16, /*slots=*/8, /*max_pages=*/4);

    // Prefill a 20-token prompt in slot 0 and a 5-token prompt in slot 3 in one ragged batch.
    pages.grow(/*slot=*/0, /*positions=*/20);  // 2 pages
    pages.grow(/*slot=*/3, /*positions=*/5);   // 1 page
    std::vector<std::int32_t> tokens(25);
    for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<std::int32_t>((7 * i + 1) % 97);  // vocabulary 97
    foe::Batch batch({{/*slot=*/0, /*start=*/0, /*length=*/20}, {/*slot=*/3, /*start=*/0, /*length=*/5}});
    batch.with_block_tables(pages.view());  // or the engine's own int32 [slots, max_pages] table
    const foe::Tensor<float> logits = model->forward(batch, tokens, foe::LogitRows::last_per_chunk);

    std::printf("logits [%lld, %lld]; %lld of %lld pages in use\n", static_cast<long long>(logits.shape()[0]),
                static_cast<long long>(logits.shape()[1]), static_cast<long long>(pages.total_pages() - pages.free_pages()),
                static_cast<long long>(pages.total_pages()));
    pages.release(0);  // a finished sequence gives its pages back
    pages.release(3);
}
