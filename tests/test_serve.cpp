// Serving: the paged KV cache against the contiguous one (bit for bit), the block manager's
// guarantees, and the continuous-batching scheduler.

#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <set>

#include "foe/serve/block_manager.hpp"
#include "test_util.hpp"

using foe::index_t;

namespace {

/// Runs the same steps on a contiguous and a paged model of the same weights and returns whether
/// every logit matched bit for bit. Each step is a ragged batch of (slot, new tokens); the paged
/// model's block manager grows every sequence before the step, interleaving their pages.
struct Step {
    index_t slot;
    index_t length;
};

bool paged_equals_contiguous(const foe::ModelConfig& c, index_t page_size, const std::vector<std::vector<Step>>& steps,
                             index_t slots, index_t capacity)
{
    const auto w = test::weights(c, 11);
    foe::ModelOptions options;
    options.cache_slots = slots;
    options.cache_capacity = capacity;
    auto contiguous = foe::make_model(w, options);
    options.page_size = page_size;
    // Just enough pages for the longest run (every slot at capacity), to exercise reuse little.
    options.cache_pages = slots * ((capacity + page_size - 1) / page_size);
    auto paged = foe::make_model<foe::gemm::Default, foe::attention::PagedKvCache>(w, options);
    foe::serve::BlockManager pages(options.cache_pages, page_size, slots, (capacity + page_size - 1) / page_size);

    std::vector<index_t> length(static_cast<std::size_t>(slots), 0);
    std::uint64_t seed = 1;
    bool same = true;
    for (const auto& step : steps) {
        std::vector<foe::SequenceChunk> chunks;
        for (const Step& s : step) {
            auto& n = length[static_cast<std::size_t>(s.slot)];
            chunks.push_back({s.slot, n, s.length});
            n += s.length;
        }
        // Grow one page at a time, sequence after sequence, so their pages interleave.
        for (bool grew = true; grew;) {
            grew = false;
            for (const auto& ch : chunks) {
                const index_t have = pages.pages_of(ch.slot) * page_size;
                if (have < ch.start + ch.length) {
                    pages.grow(ch.slot, have + page_size);
                    grew = true;
                }
            }
        }
        foe::Batch batch(chunks);
        const auto tokens = test::random_tokens(static_cast<std::size_t>(batch.tokens()), c.vocab_size, seed++);
        const auto expected = contiguous->forward(batch, tokens);
        batch.with_block_tables(pages.view());
        const auto got = paged->forward(batch, tokens);
        same = same && expected.values() == got.values();
    }
    return same;
}

}  // namespace

TEST_CASE("paged KV cache: the same logits bit for bit as the contiguous cache, page sizes 1, 16 and 5")
{
    // Three sequences: a ragged prefill (prompts of 13, 7 and 20 tokens, 13 not a multiple of 5
    // or 16), decode steps that cross page boundaries, a second prefill chunk, and a mixed step.
    const std::vector<std::vector<Step>> steps{
        {{0, 13}, {1, 7}, {2, 20}},
        {{0, 1}, {1, 1}, {2, 1}},
        {{0, 1}, {1, 1}, {2, 1}},
        {{1, 9}},                    // chunked prefill: slot 1 grows from 9 to 18 positions
        {{0, 1}, {1, 1}, {2, 12}},   // decode mixed with a prefill chunk
        {{0, 1}, {1, 1}, {2, 1}},
    };
    for (index_t page : {1, 16, 5}) {
        CAPTURE(page);
        CHECK(paged_equals_contiguous(test::tiny(foe::Architecture::foe, 4), page, steps, 3, 48));
        CHECK(paged_equals_contiguous(test::tiny(foe::Architecture::olmoe, 1), page, steps, 3, 48));
    }
}

TEST_CASE("paged KV cache: a batch without block tables, or with a missing page, is refused before anything changes")
{
    const auto c = test::tiny(foe::Architecture::foe, 2);
    foe::ModelOptions options;
    options.cache_slots = 2;
    options.cache_capacity = 32;
    options.page_size = 4;
    auto model = foe::make_model<foe::gemm::Default, foe::attention::PagedKvCache>(test::weights(c), options);
    const auto tokens = test::random_tokens(6, c.vocab_size, 3);
    foe::Batch plain = foe::Batch::single(0, 6);
    CHECK_THROWS_WITH_AS((void)model->forward(plain, tokens), doctest::Contains("needs the batch's block tables"),
                         foe::InvalidArgument);

    foe::serve::BlockManager pages(16, 4, 2, 8);
    pages.grow(0, 4);  // one page: positions [0, 4), the batch needs [0, 6)
    foe::Batch short_of_pages = foe::Batch::single(0, 6);
    short_of_pages.with_block_tables(pages.view());
    CHECK_THROWS_WITH_AS((void)model->forward(short_of_pages, tokens), doctest::Contains("has no page for positions [4, 8)"),
                         foe::CapacityError);
    CHECK(model->sequence_length(0) == 0);

    foe::serve::BlockManager other(16, 8, 2, 8);  // pages of 8 positions for a cache of pages of 4
    other.grow(0, 6);
    foe::Batch wrong_size = foe::Batch::single(0, 6);
    wrong_size.with_block_tables(other.view());
    CHECK_THROWS_WITH_AS((void)model->forward(wrong_size, tokens), doctest::Contains("pages of 8 positions"),
                         foe::InvalidArgument);

    pages.grow(0, 6);
    short_of_pages.with_block_tables(pages.view());
    CHECK(model->forward(short_of_pages, tokens).shape()[0] == 6);
    CHECK(model->sequence_length(0) == 6);
}

TEST_CASE("block manager: no page twice, everything freed, impossible requests refused, failed grows change nothing")
{
    foe::serve::BlockManager m(10, 4, 3, 5);
    CHECK(m.max_positions() == 20);
    CHECK_THROWS_WITH_AS(m.check_fits_ever(21), doctest::Contains("needs 6 pages of 4 positions; a block table row holds 5"),
                         foe::CapacityError);
    foe::serve::BlockManager small(3, 4, 3, 5);
    CHECK_THROWS_WITH_AS(small.check_fits_ever(13), doctest::Contains("the pool has 3 pages (12 positions)"),
                         foe::CapacityError);
    m.check_fits_ever(20);

    // A seeded walk of grows and releases; after each, the held pages are distinct and, with
    // the free ones, exactly the pool.
    const foe::CounterRng rng(5, 1);
    for (std::uint64_t i = 0; i < 400; ++i) {
        const auto slot = static_cast<index_t>(rng.bits(2 * i) % 3);
        if (rng.bits(2 * i + 1) % 4 == 0) {
            m.release(slot);
        } else {
            const index_t want = m.pages_of(slot) * 4 + 1 + static_cast<index_t>(rng.bits(2 * i + 1) % 6);
            const index_t free_before = m.free_pages(), held_before = m.pages_of(slot);
            if (m.can_grow(slot, want)) {
                m.grow(slot, want);
                CHECK(m.pages_of(slot) == m.pages_for(want));
            } else {
                CHECK_THROWS_AS(m.grow(slot, want), foe::CapacityError);
                CHECK(m.free_pages() == free_before);
                CHECK(m.pages_of(slot) == held_before);
            }
        }
        std::multiset<index_t> seen;
        const auto v = m.view();
        index_t held = 0;
        for (index_t s = 0; s < 3; ++s) {
            for (index_t p = 0; p < m.pages_of(s); ++p) seen.insert(v.page(s, p));
            for (index_t p = m.pages_of(s); p < 5; ++p) CHECK(v.page(s, p) == -1);
            held += m.pages_of(s);
        }
        CHECK(std::set<index_t>(seen.begin(), seen.end()).size() == seen.size());  // no page twice
        CHECK(held + m.free_pages() == 10);
    }
    for (index_t s = 0; s < 3; ++s) m.release(s);
    CHECK(m.free_pages() == 10);
    // A fresh pool hands out pages lowest first.
    foe::serve::BlockManager fresh(4, 2, 1, 4);
    fresh.grow(0, 5);
    CHECK(fresh.view().page(0, 0) == 0);
    CHECK(fresh.view().page(0, 2) == 2);
    CHECK_THROWS_AS(fresh.grow(3, 1), foe::InvalidArgument);
}
