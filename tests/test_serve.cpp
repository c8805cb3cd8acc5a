// Serving: the paged KV cache against the contiguous one (bit for bit), the block manager's
// guarantees, and the continuous-batching scheduler.

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "foe/attention/kv_cache.hpp"
#include "foe/attention/kv_layout.hpp"
#include "foe/serve/block_manager.hpp"
#include "foe/serve/scheduler.hpp"
#include "foe/serve/simulate.hpp"
#include "foe/serve/trace.hpp"
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

TEST_CASE("paged KV layout: the index rule the device kernels use is the host PagedKvCache's addressing")
{
    // Pages of 1, 16 and 5 positions; each slot's pages a shuffled, non-consecutive subset of the
    // pool; some rows end in unassigned (-1) pages, one entry names a page past the pool.
    for (const index_t page : {1, 16, 5}) {
        CAPTURE(page);
        const index_t slots = 4, max_pages = 9, kv_heads = 3, head_dim = 6;
        const index_t pool = slots * max_pages;
        foe::attention::KvCacheShape shape;
        shape.kv_heads = kv_heads;
        shape.head_dim = head_dim;
        shape.page_size = page;
        shape.pages = pool;
        foe::attention::PagedKvCache cache(shape);

        std::vector<std::int32_t> order(static_cast<std::size_t>(pool));
        for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<std::int32_t>(i);
        const foe::CounterRng rng(static_cast<std::uint64_t>(page), 7);
        for (std::size_t i = order.size() - 1; i > 0; --i)
            std::swap(order[i], order[static_cast<std::size_t>(rng.bits(i) % (i + 1))]);
        std::vector<std::int32_t> table = order;  // [slots, max_pages]: every pool page once
        table[1 * max_pages + 7] = -1;            // slot 1 holds 7 pages, slot 3 holds 4
        table[1 * max_pages + 8] = -1;
        for (index_t i = 4; i < max_pages; ++i) table[static_cast<std::size_t>(3 * max_pages + i)] = -1;
        table[2 * max_pages + 5] = static_cast<std::int32_t>(pool);  // not a page of this pool

        const foe::BlockTableView view{page, slots, max_pages, table.data()};
        foe::Batch batch = foe::Batch::single(0, 1);
        batch.with_block_tables(view);
        const auto layout = cache.layout(view);
        CHECK(layout.positions() == max_pages * page);

        // Host addresses relative to row (slot 0, head 0, position 0), which slot 0's first page holds.
        const std::int64_t origin_offset = std::int64_t{table[0]} * kv_heads * page * head_dim;
        const float* origin = cache.key(batch, 0, 0, 0);
        const float* value_origin = cache.value(batch, 0, 0, 0);

        std::set<std::int64_t> seen;
        for (index_t s = 0; s < slots; ++s)
            for (index_t pos = -2; pos < max_pages * page + 3; ++pos) {
                const index_t i = pos < 0 ? -1 : pos / page;
                const index_t entry = i < 0 || i >= max_pages ? -1 : table[static_cast<std::size_t>(s * max_pages + i)];
                const bool mapped = entry >= 0 && entry < pool;
                CHECK(layout.page(s, pos) == (mapped ? entry : -1));
                CHECK(layout.page(static_cast<int>(s), static_cast<int>(pos)) == (mapped ? entry : -1));
                for (index_t kv = 0; kv < kv_heads; ++kv) {
                    const std::int64_t got = layout.offset(s, kv, pos, kv_heads, head_dim);
                    // int32 arguments, as the kernels pass them, give the same offset.
                    CHECK(got == layout.offset(static_cast<int>(s), static_cast<int>(kv), static_cast<int>(pos),
                                               static_cast<int>(kv_heads), static_cast<int>(head_dim)));
                    if (!mapped) {
                        CHECK(got == -1);
                        continue;
                    }
                    const std::int64_t want = ((entry * kv_heads + kv) * page + pos % page) * head_dim;
                    CHECK(got == want);
                    CHECK(cache.key(batch, s, kv, pos) - origin == want - origin_offset);
                    CHECK(cache.value(batch, s, kv, pos) - value_origin == want - origin_offset);
                    CHECK(seen.insert(got).second);  // no two (slot, head, position) share a row
                }
            }
        // Every mapped pool page's rows are addressed once: all pages but the one replaced by an
        // entry past the pool and the ones behind -1 entries.
        const index_t unmapped_pages = 2 + (max_pages - 4) + 1;
        CHECK(static_cast<index_t>(seen.size()) == (pool - unmapped_pages) * page * kv_heads);

        // The contiguous layout's rule is the tensor's row-major one, and maps [0, capacity) only.
        const foe::attention::ContiguousKvLayout contiguous{static_cast<std::int32_t>(max_pages * page)};
        foe::attention::ContiguousKvCache flat(slots, max_pages * page, kv_heads, head_dim);
        for (index_t s = 0; s < slots; ++s)
            for (index_t pos = -1; pos <= max_pages * page; ++pos)
                for (index_t kv = 0; kv < kv_heads; ++kv) {
                    const std::int64_t got = contiguous.offset(s, kv, pos, kv_heads, head_dim);
                    if (pos < 0 || pos == max_pages * page) {
                        CHECK(got == -1);
                        continue;
                    }
                    CHECK(flat.key(batch, s, kv, pos) - flat.key(batch, 0, 0, 0) == got);
                }
    }
    const foe::attention::PagedKvLayout bad{0, 4, nullptr, 8};
    CHECK_THROWS_WITH_AS(bad.check("test"), doctest::Contains("KV page size 0 must be positive"), foe::InvalidArgument);
    const foe::attention::PagedKvLayout no_table{16, 4, nullptr, 8};
    CHECK_THROWS_WITH_AS(no_table.check("test"), doctest::Contains("needs a block table"), foe::InvalidArgument);
    const std::int32_t one = 0;
    const foe::attention::PagedKvLayout huge{1 << 16, 1 << 16, &one, 8};
    CHECK_THROWS_WITH_AS(huge.check("test"), doctest::Contains("exceed the 2^31 - 1 positions"), foe::InvalidArgument);
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

TEST_CASE("paged KV cache: block tables naming pages outside the pool, slots outside the tables or rows past int32 are refused")
{
    const foe::attention::PagedKvCache cache(foe::attention::KvCacheShape{1, 2, 2, 8, 4, 4});
    std::vector<std::int32_t> table{0, 7, 1, 2};  // slot 0: pages 0 and 7 (the pool has 4), slot 1: 1 and 2
    auto batch = [&](index_t slot, index_t length, foe::BlockTableView t) {
        foe::Batch b = foe::Batch::single(0, length, slot);
        b.with_block_tables(t);
        return b;
    };
    const foe::BlockTableView view{4, 2, 2, table.data()};
    CHECK_NOTHROW(cache.check_fits(batch(0, 4, view)));
    CHECK_THROWS_WITH_AS(cache.check_fits(batch(0, 5, view)), doctest::Contains("names page 7 but the pool has 4"),
                         foe::InvalidArgument);
    CHECK_NOTHROW(cache.check_fits(batch(1, 8, view)));
    CHECK_THROWS_WITH_AS(cache.check_fits(batch(1, 9, view)), doctest::Contains("needs positions up to 9"), foe::CapacityError);
    CHECK_THROWS_WITH_AS(cache.check_fits(batch(2, 1, view)), doctest::Contains("the block tables have 2 slot(s)"),
                         foe::InvalidArgument);
    table[2] = -1;
    CHECK_THROWS_WITH_AS(cache.check_fits(batch(1, 1, view)), doctest::Contains("has no page for positions [0, 4)"),
                         foe::CapacityError);
    // A row longer than int32 would be narrowed (and misread) by the layout: refused first.
    const foe::BlockTableView long_rows{4, 1, (index_t{1} << 31) + 1, table.data()};
    CHECK_THROWS_WITH_AS(cache.check_fits(batch(0, 4, long_rows)), doctest::Contains("exceed the 2^31 - 1 positions"),
                         foe::InvalidArgument);
    CHECK_THROWS_AS(foe::Batch::single(0, 4).check_pages(4), foe::InvalidArgument);
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

namespace {

/// A virtual clock: each step takes `step_time`; waiting jumps to the arrival.
struct VirtualClock {
    double now = 0.0;
    double step_time = 1.0;
};

/// Serves `requests` with a host model (paged KV cache of the given pool) on a virtual clock.
std::vector<foe::serve::RequestRecord> serve(const foe::ModelConfig& c, const std::vector<foe::serve::Request>& requests,
                                             index_t slots, index_t pages, index_t page_size, index_t budget)
{
    foe::ModelOptions options;
    options.cache_slots = slots;
    options.cache_capacity = 64;
    options.page_size = page_size;
    options.cache_pages = pages;
    auto model = foe::make_model<foe::gemm::Default, foe::attention::PagedKvCache>(test::weights(c, 3), options);
    foe::serve::BlockManager manager(pages, page_size, slots, (64 + page_size - 1) / page_size);
    foe::serve::SchedulerOptions so;
    so.token_budget = budget;
    foe::serve::Scheduler scheduler(manager, so);
    for (const auto& r : requests) scheduler.submit(r);
    VirtualClock clock;
    foe::serve::run(
        scheduler, [&] { return clock.now; }, [&](double t) { clock.now = t; },
        [&](const foe::serve::StepPlan& step) {
            clock.now += clock.step_time;
            return model->forward(step.batch, step.tokens, foe::LogitRows::last_per_chunk);
        });
    return scheduler.records();
}

std::vector<foe::serve::Request> seeded_trace(index_t n, index_t vocab, std::uint64_t seed)
{
    const foe::CounterRng rng(seed, 2);
    std::vector<foe::serve::Request> out;
    double t = 0.0;
    for (index_t i = 0; i < n; ++i) {
        t += 2.0 * rng.uniform01(static_cast<std::uint64_t>(3 * i));  // about one arrival per step
        const auto prompt = 3 + static_cast<index_t>(rng.bits(static_cast<std::uint64_t>(3 * i + 1)) % 18);
        const auto length = 2 + static_cast<index_t>(rng.bits(static_cast<std::uint64_t>(3 * i + 2)) % 7);
        out.push_back({i, t, test::random_tokens(static_cast<std::size_t>(prompt), vocab, 40 + static_cast<std::uint64_t>(i)), length});
    }
    return out;
}

}  // namespace

TEST_CASE("scheduler: TTFT and TBT of a hand-made trace, step by step")
{
    // Budget 4, two slots. A (t = 0, prompt 3, 3 tokens) and B (t = 0.5, prompt 6, 2 tokens);
    // every step takes 1 s. Step 1 [0, 1): A's prompt. Step 2 [1, 2): A decodes, B's first 3.
    // Step 3 [2, 3): A decodes, B's last 3. Step 4 [3, 4): B decodes.
    foe::serve::BlockManager manager(16, 4, 2, 4);
    foe::serve::SchedulerOptions so;
    so.token_budget = 4;
    foe::serve::Scheduler scheduler(manager, so);
    scheduler.submit({0, 0.0, {1, 2, 3}, 3});
    scheduler.submit({1, 0.5, {4, 5, 6, 7, 8, 9}, 2});
    VirtualClock clock;
    std::vector<std::pair<index_t, index_t>> shape;  // (prefill, decode) tokens per step
    const index_t vocab = 8;
    foe::serve::run(
        scheduler, [&] { return clock.now; }, [&](double t) { clock.now = t; },
        [&](const foe::serve::StepPlan& step) {
            clock.now += 1.0;
            shape.emplace_back(step.prefill_tokens(), step.decode_tokens());
            // The next token is the chunk's last token + 1 (mod vocab): a deterministic fake model.
            foe::Tensor<float> logits({step.batch.sequences(), vocab});
            for (index_t c = 0; c < step.batch.sequences(); ++c) {
                const auto last = step.tokens[static_cast<std::size_t>(step.batch.offset(c + 1) - 1)];
                logits.values()[static_cast<std::size_t>(c * vocab + (last + 1) % vocab)] = 1.0f;
            }
            return logits;
        });
    CHECK(shape == std::vector<std::pair<index_t, index_t>>{{3, 0}, {3, 1}, {3, 1}, {0, 1}});
    const auto& a = scheduler.records()[0];
    const auto& b = scheduler.records()[1];
    CHECK(a.tokens == std::vector<std::int32_t>{4, 5, 6});
    CHECK(a.token_times == std::vector<double>{1.0, 2.0, 3.0});
    CHECK(a.ttft() == 1.0);
    CHECK(a.tbt() == std::vector<double>{1.0, 1.0});
    CHECK(b.tokens == std::vector<std::int32_t>{2, 3});  // 9 + 1 = 10 = 2 (mod 8), then 3
    CHECK(b.ttft() == 2.5);
    CHECK(b.tbt() == std::vector<double>{1.0});
    CHECK(manager.free_pages() == 16);
}

TEST_CASE("scheduler: a seeded trace on a model gives every request the tokens it gets alone, with and without preemption")
{
    for (auto arch : {foe::Architecture::foe, foe::Architecture::olmoe}) {
        const auto c = test::tiny(arch, arch == foe::Architecture::foe ? 4 : 1);
        const auto requests = seeded_trace(8, c.vocab_size, 17);
        // Each alone, greedy, on a contiguous model of the same weights.
        std::vector<std::vector<std::int32_t>> alone;
        for (const auto& r : requests) {
            foe::ModelOptions o;
            o.cache_capacity = 64;
            alone.push_back(foe::make_model(test::weights(c, 3), o)->generate(r.prompt, r.max_new_tokens));
        }
        // Plenty of pages; then a pool of 9 pages of 4 positions for 3 slots (one 20-token
        // prompt with 8 new tokens needs 7), which forces preemptions.
        for (index_t pages : {48, 9}) {
            CAPTURE(pages);
            const auto records = serve(c, requests, 3, pages, 4, 16);
            index_t preemptions = 0;
            for (std::size_t i = 0; i < records.size(); ++i) {
                CAPTURE(i);
                CHECK(records[i].tokens == alone[i]);
                CHECK(records[i].token_times.size() == records[i].tokens.size());
                CHECK(records[i].ttft() > 0.0);
                preemptions += records[i].preemptions;
            }
            if (pages == 9) CHECK(preemptions > 0);
            else CHECK(preemptions == 0);
        }
    }
}

TEST_CASE("scheduler: a request that can never fit is refused when submitted, naming it and the limit")
{
    foe::serve::BlockManager manager(4, 4, 2, 8);
    foe::serve::Scheduler scheduler(manager);
    CHECK_THROWS_WITH_AS(scheduler.submit({7, 0.0, std::vector<std::int32_t>(15, 1), 3}),
                         doctest::Contains("request 7 can never be served"), foe::CapacityError);
    CHECK_THROWS_AS(scheduler.submit({8, 0.0, {}, 3}), foe::InvalidArgument);
    scheduler.submit({9, 1.0, std::vector<std::int32_t>(14, 1), 3});  // 16 positions: the whole pool
    CHECK_THROWS_WITH_AS(scheduler.submit({10, 0.5, {1}, 1}), doctest::Contains("before the request submitted before it"),
                         foe::InvalidArgument);
}

namespace {

/// A fake model for scheduler tests: it keeps each slot's tokens as its "KV cache" and the next
/// token is a hash of the whole sequence, so a wrong token, position or slot in any step changes
/// every later token. It also checks each step's block tables: every position mapped, no page
/// in two slots.
struct HashModel {
    index_t vocab = 7;
    index_t pool = 0;
    std::vector<std::vector<std::int32_t>> cache;
    index_t steps = 0, max_steps = 20000;

    static std::int32_t next(const std::vector<std::int32_t>& seq, index_t vocab)
    {
        std::uint64_t h = 1469598103934665603ULL;
        for (auto t : seq) h = (h ^ static_cast<std::uint64_t>(t)) * 1099511628211ULL;
        return static_cast<std::int32_t>(h % static_cast<std::uint64_t>(vocab));
    }
    /// What the request generates alone.
    static std::vector<std::int32_t> alone(std::vector<std::int32_t> seq, index_t n, index_t vocab,
                                           const std::vector<std::int32_t>& stop = {})
    {
        std::vector<std::int32_t> out;
        while (static_cast<index_t>(out.size()) < n) {
            out.push_back(next(seq, vocab));
            seq.push_back(out.back());
            if (std::find(stop.begin(), stop.end(), out.back()) != stop.end()) break;
        }
        return out;
    }

    foe::Tensor<float> operator()(const foe::serve::StepPlan& step)
    {
        REQUIRE(++steps <= max_steps);  // a livelock fails here instead of hanging
        const foe::BlockTableView& t = *step.batch.block_tables();
        step.batch.check_pages(pool);
        std::set<index_t> used;
        index_t mapped = 0;
        for (index_t s = 0; s < t.slots; ++s)
            for (index_t i = 0; i < t.max_pages; ++i)
                if (t.page(s, i) >= 0) {
                    used.insert(t.page(s, i));
                    ++mapped;
                }
        REQUIRE(static_cast<index_t>(used.size()) == mapped);
        cache.resize(static_cast<std::size_t>(t.slots));
        foe::Tensor<float> logits({step.batch.sequences(), vocab});
        for (index_t c = 0; c < step.batch.sequences(); ++c) {
            const auto& ch = step.batch.chunks()[static_cast<std::size_t>(c)];
            auto& seq = cache[static_cast<std::size_t>(ch.slot)];
            REQUIRE(ch.start <= static_cast<index_t>(seq.size()));
            seq.resize(static_cast<std::size_t>(ch.start));  // a recomputation overwrites
            const auto first = step.tokens.begin() + step.batch.offset(c);
            seq.insert(seq.end(), first, first + ch.length);
            logits.values()[static_cast<std::size_t>(c * vocab + next(seq, vocab))] = 1.0f;
        }
        return logits;
    }
};

struct HashRun {
    std::vector<foe::serve::RequestRecord> records;
    index_t steps = 0;
};

HashRun serve_hash(const std::vector<foe::serve::Request>& requests, index_t slots, index_t pages, index_t page_size,
                   index_t max_pages, index_t budget, index_t vocab, std::vector<std::int32_t> stop = {})
{
    foe::serve::BlockManager manager(pages, page_size, slots, max_pages);
    foe::serve::SchedulerOptions so;
    so.token_budget = budget;
    so.stop_tokens = std::move(stop);
    foe::serve::Scheduler scheduler(manager, so);
    for (const auto& r : requests) scheduler.submit(r);
    HashModel model{vocab, pages, {}, 0, 20000};
    VirtualClock clock;
    foe::serve::run(
        scheduler, [&] { return clock.now; }, [&](double t) { clock.now = t; },
        [&](const foe::serve::StepPlan& step) {
            clock.now += clock.step_time;
            return model(step);
        });
    CHECK(manager.free_pages() == pages);
    return {scheduler.records(), model.steps};
}

}  // namespace

TEST_CASE("scheduler: random small pools, budgets and traces finish with the tokens of each request alone")
{
    // Pools just large enough for the longest request, budgets below the running decodes, page
    // sizes 1 to 5, requests arriving together: every request finishes (no livelock), its tokens
    // are those it makes alone (preempted or not), and every page comes back.
    const foe::CounterRng rng(99, 5);
    std::uint64_t k = 0;
    for (int trial = 0; trial < 300; ++trial) {
        CAPTURE(trial);
        const index_t page_size = 1 + static_cast<index_t>(rng.bits(k++) % 5);
        const index_t slots = 1 + static_cast<index_t>(rng.bits(k++) % 5);
        const index_t budget = 1 + static_cast<index_t>(rng.bits(k++) % 12);
        const index_t n = 1 + static_cast<index_t>(rng.bits(k++) % 8);
        std::vector<foe::serve::Request> requests;
        index_t longest = 0;
        double t = 0.0;
        for (index_t i = 0; i < n; ++i) {
            if (rng.bits(k++) % 2) t += static_cast<double>(rng.bits(k++) % 4);  // often together
            const auto prompt = 1 + static_cast<index_t>(rng.bits(k++) % 14);
            const auto length = 1 + static_cast<index_t>(rng.bits(k++) % 10);
            longest = std::max(longest, prompt + length - 1);
            requests.push_back({i, t, test::random_tokens(static_cast<std::size_t>(prompt), 7, k++), length});
        }
        const index_t need = (longest + page_size - 1) / page_size;
        const index_t pages = need + static_cast<index_t>(rng.bits(k++) % 3);
        CAPTURE(page_size);
        CAPTURE(slots);
        CAPTURE(budget);
        CAPTURE(pages);
        const auto run = serve_hash(requests, slots, pages, page_size, need, budget, 7);
        for (std::size_t i = 0; i < requests.size(); ++i) {
            CAPTURE(i);
            CHECK(run.records[i].tokens == HashModel::alone(requests[i].prompt, requests[i].max_new_tokens, 7));
            CHECK(run.records[i].token_times.size() == run.records[i].tokens.size());
        }
    }
}

TEST_CASE("scheduler: edge cases: a request that fills the pool, one new token, stop tokens, a budget of 1")
{
    const index_t vocab = 7;
    const auto prompt = test::random_tokens(10, vocab, 5);
    // Prompt 10 + 7 new tokens = 16 positions cached (the last token is never appended): exactly
    // the pool of 4 pages of 4. Alone, twice in a row (the second waits for the first's pages).
    {
        const auto run = serve_hash({{0, 0.0, prompt, 7}, {1, 0.0, prompt, 7}}, 2, 4, 4, 4, 16, vocab);
        CHECK(run.records[0].tokens == HashModel::alone(prompt, 7, vocab));
        CHECK(run.records[1].tokens == run.records[0].tokens);
        CHECK(run.records[1].token_times.front() > run.records[0].token_times.back());  // it waited
    }
    // One new token: the prompt's step gives it, and the request ends there (TTFT, no TBT).
    {
        const auto run = serve_hash({{0, 0.5, prompt, 1}}, 1, 3, 4, 3, 16, vocab);
        CHECK(run.records[0].tokens.size() == 1);
        CHECK(run.records[0].ttft() == 1.0);  // arrives at 0.5 (the run waits for it), one 1 s step
        CHECK(run.records[0].tbt().empty());
        CHECK(run.steps == 1);
    }
    // Stop tokens end a request early, the stop token kept; the others run on unaffected.
    {
        const std::vector<std::int32_t> stop{2, 5};
        std::vector<foe::serve::Request> requests;
        for (index_t i = 0; i < 6; ++i)
            requests.push_back({i, 0.0, test::random_tokens(static_cast<std::size_t>(3 + i), vocab, 60 + i), 12});
        const auto run = serve_hash(requests, 3, 12, 2, 10, 5, vocab, stop);
        bool stopped = false;
        for (std::size_t i = 0; i < requests.size(); ++i) {
            CAPTURE(i);
            const auto expected = HashModel::alone(requests[i].prompt, 12, vocab, stop);
            CHECK(run.records[i].tokens == expected);
            stopped = stopped || expected.size() < 12;
        }
        CHECK(stopped);
    }
    // A budget of 1 with three requests decoding: one token a step, each still gets its tokens,
    // and its TBT gaps are whole steps.
    {
        std::vector<foe::serve::Request> requests;
        for (index_t i = 0; i < 3; ++i) requests.push_back({i, 0.0, {static_cast<std::int32_t>(i + 1)}, 4});
        const auto run = serve_hash(requests, 3, 6, 4, 2, 1, vocab);
        CHECK(run.steps == 12);
        for (std::size_t i = 0; i < requests.size(); ++i) {
            CHECK(run.records[i].tokens == HashModel::alone(requests[i].prompt, 4, vocab));
            for (double gap : run.records[i].tbt()) CHECK(gap >= 1.0);
        }
    }
}

TEST_CASE("scheduler: a preempted request keeps the times of the tokens it had, and absurd requests are refused")
{
    // Pool of 6 pages of 1 position, two slots: A (t = 0) and B (t = 0) with prompts of 2 and 5
    // new tokens each need 6 positions; B, the newer, is preempted when A needs a page.
    const index_t vocab = 7;
    const auto pa = test::random_tokens(2, vocab, 71), pb = test::random_tokens(2, vocab, 72);
    const auto run = serve_hash({{0, 0.0, pa, 5}, {1, 0.0, pb, 5}}, 2, 6, 1, 6, 8, vocab);
    const auto& a = run.records[0];
    const auto& b = run.records[1];
    CHECK(a.preemptions == 0);
    CHECK(b.preemptions > 0);
    CHECK(a.tokens == HashModel::alone(pa, 5, vocab));
    CHECK(b.tokens == HashModel::alone(pb, 5, vocab));
    CHECK(b.token_times.size() == 5);
    CHECK(std::is_sorted(b.token_times.begin(), b.token_times.end()));
    CHECK(b.ttft() == 1.0);  // its first token came before the preemption and keeps its time
    CHECK(b.token_times.back() > a.token_times.back());

    foe::serve::BlockManager manager(4, 4, 2, 8);
    foe::serve::Scheduler scheduler(manager);
    CHECK_THROWS_WITH_AS(scheduler.submit({3, 0.0, {1}, std::numeric_limits<index_t>::max()}),
                         doctest::Contains("request 3 can never be served"), foe::CapacityError);
    CHECK_THROWS_AS(scheduler.submit({4, std::numeric_limits<double>::quiet_NaN(), {1}, 1}), foe::InvalidArgument);
    CHECK_THROWS_AS(scheduler.submit({5, std::numeric_limits<double>::infinity(), {1}, 1}), foe::InvalidArgument);
    CHECK_THROWS_AS(scheduler.submit({6, 0.0, {1}, 0}), foe::InvalidArgument);
    // Sizes whose tables could not be allocated, or whose positions pass 2^31, are refused first.
    CHECK_THROWS_AS(foe::serve::BlockManager(16, 16, index_t{1} << 30, index_t{1} << 30), foe::InvalidArgument);
    CHECK_THROWS_AS(foe::serve::BlockManager(16, index_t{1} << 40, 1, 1), foe::InvalidArgument);
    CHECK_THROWS_AS(foe::serve::BlockManager(16, 1 << 16, 1, 1 << 16), foe::InvalidArgument);
    CHECK_THROWS_AS(foe::serve::BlockManager(0, 16, 1, 1), foe::InvalidArgument);
    // simulate() refuses a prompt longer than a sequence holds before building it.
    foe::serve::BlockManager small(4, 4, 1, 4);
    CHECK_THROWS_WITH_AS((void)foe::serve::simulate({{0.0, (index_t{1} << 31) - 1, 1}}, small, {},
                                                    [](const foe::serve::StepPlan&) { return 1.0; }),
                         doctest::Contains("request 0 can never be served"), foe::CapacityError);
}

namespace {

/// Writes `text` to a file of the test's temporary directory and returns its path.
std::filesystem::path trace_file(const std::string& name, const std::string& text)
{
    const auto path = std::filesystem::temp_directory_path() / ("foe_test_serve_" + name + ".csv");
    std::ofstream(path) << text;
    return path;
}

}  // namespace

TEST_CASE("read_trace: comments, blank lines and CRLF read, anything else is an error naming the line")
{
    const auto good = foe::serve::read_trace(trace_file("good", "# arrival,prompt,output\n\n0,12,3\r\n 0.25 , 7 ,1 # two\n0.25,1,9\n"));
    REQUIRE(good.size() == 3);
    CHECK(good[1].arrival == 0.25);
    CHECK(good[1].prompt_tokens == 7);
    CHECK(good[1].output_tokens == 1);
    CHECK(good[2].output_tokens == 9);

    struct Bad {
        const char* text;
        const char* says;
    };
    for (const Bad& bad : {Bad{"0,1,2\n1,2,3.5\n", ":2: expected"}, Bad{"0,1,2,4\n", ":1: expected"},
                           Bad{"0,1,2x\n", ":1: expected"}, Bad{"0;1;2\n", ":1: expected"},
                           Bad{"0,1\n", ":1: expected"}, Bad{"abc\n", ":1: expected"},
                           Bad{"nan,1,2\n", ":1: the arrival nan"}, Bad{"inf,1,2\n", ":1: the arrival inf"},
                           Bad{"1e999,1,2\n", ":1: the arrival"}, Bad{"-1,1,2\n", ":1: the arrival -1"},
                           Bad{"0,0,2\n", ":1: token counts"}, Bad{"0,5,-2\n", ":1: token counts"},
                           Bad{"0,2147483648,2\n", "2147483648"}, Bad{"0,99999999999999999999999,2\n", ":1: token counts"},
                           Bad{"1,1,1\n0.5,1,1\n", ":2: arrivals must not go back in time"},
                           Bad{"# nothing\n\n", "holds no request"}, Bad{"", "holds no request"}}) {
        CAPTURE(bad.text);
        CHECK_THROWS_WITH_AS((void)foe::serve::read_trace(trace_file("bad", bad.text)), doctest::Contains(bad.says),
                             foe::InvalidArgument);
    }
    CHECK_THROWS_AS((void)foe::serve::read_trace("/nonexistent/foe_trace.csv"), foe::IoError);
}

TEST_CASE("LengthDistribution::parse and make_trace: named errors, and the same spec draws the same trace in bounds")
{
    using foe::serve::LengthDistribution;
    CHECK(LengthDistribution::parse("fixed:7").low == 7);
    const auto u = LengthDistribution::parse("uniform:3:3");
    CHECK((u.kind == LengthDistribution::Kind::uniform && u.low == 3 && u.high == 3));
    CHECK(LengthDistribution::parse("longbench").kind == LengthDistribution::Kind::longbench);
    for (const char* bad : {"fixed:0", "fixed:-1", "fixed:", "fixed:1.5", "fixed: 3", "uniform:5", "uniform:5:3",
                            "uniform::3", "uniform:1:2:3", "fixed:2147483648", "fixed:99999999999", "fixed:999999999999",
                            "normal:3", "", "LongBench"}) {
        CAPTURE(bad);
        const std::string quoted = std::string("\"") + bad + "\"";
        CHECK_THROWS_WITH_AS((void)LengthDistribution::parse(bad), doctest::Contains(quoted.c_str()), foe::InvalidArgument);
    }
    foe::serve::TraceSpec spec;
    spec.requests = 200;
    spec.rate = 3.0;
    spec.prompt = LengthDistribution::parse("longbench");
    spec.output = LengthDistribution::parse("uniform:2:9");
    spec.max_prompt = 4000;
    const auto trace = foe::serve::make_trace(spec);
    const auto again = foe::serve::make_trace(spec);
    for (std::size_t i = 0; i < trace.size(); ++i) {
        CAPTURE(i);
        CHECK(trace[i].arrival == again[i].arrival);
        CHECK(trace[i].prompt_tokens == again[i].prompt_tokens);
        CHECK((trace[i].prompt_tokens >= 64 && trace[i].prompt_tokens <= 4000));
        CHECK((trace[i].output_tokens >= 2 && trace[i].output_tokens <= 9));
        if (i > 0) CHECK(trace[i].arrival >= trace[i - 1].arrival);
    }
    spec.rate = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS((void)foe::serve::make_trace(spec), foe::InvalidArgument);
}
