// foe's device attention against a float64 GQA attention over ragged batches: the KV-cache
// append (bit-exact), causal prefill (tensor-core kernel at head_dim 32/64/96/128, the simple
// kernel otherwise), and the dispatcher's decode path against the prefill kernel. Inputs are bf16;
// the oracle computes in float64 on the same bf16 values. Outputs and workspaces are poisoned
// (0xff bytes: NaN in bf16) before every run, cache positions no row may see hold NaN, and every
// kernel runs twice and must give the same bits.
// Without a CUDA device every test case says so and passes.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/decode_attention.cuh"
#include "foe/cuda/kv_cache.cuh"
#include "foe/cuda/kv_layout.cuh"
#include "foe/cuda/prefill_attention.cuh"
#include "foe/cuda/stream.cuh"
#include "foe/layer/batch.hpp"

using foe::bfloat16;
using foe::index_t;
namespace fc = foe::cuda;

using namespace foe::cuda::testing;

namespace {

constexpr std::uint16_t nan_bits = 0xffff;  // what 0xff poisoning leaves: a bf16 NaN

/// A foe::Batch in device memory, with the DeviceBatch view the kernels take.
struct DeviceBatchData {
    fc::DeviceBuffer<std::int32_t> row_offsets, slots, starts, lengths, token_slots, positions;
    fc::DeviceBatch view;
};

DeviceBatchData upload_batch(const foe::Batch& batch)
{
    std::vector<std::int32_t> ro, sl, st, le, ts, po;
    index_t max_new = 0;
    for (index_t b = 0; b < batch.sequences(); ++b) {
        const auto& c = batch.chunks()[sz(b)];
        ro.push_back(static_cast<std::int32_t>(batch.offset(b)));
        sl.push_back(static_cast<std::int32_t>(c.slot));
        st.push_back(static_cast<std::int32_t>(c.start));
        le.push_back(static_cast<std::int32_t>(c.start + c.length));
        for (index_t i = 0; i < c.length; ++i) {
            ts.push_back(static_cast<std::int32_t>(c.slot));
            po.push_back(static_cast<std::int32_t>(c.start + i));
        }
        max_new = std::max(max_new, c.length);
    }
    ro.push_back(static_cast<std::int32_t>(batch.tokens()));
    DeviceBatchData d{fc::upload(ro), fc::upload(sl), fc::upload(st), fc::upload(le), fc::upload(ts), fc::upload(po), {}};
    d.view = fc::DeviceBatch{d.row_offsets.data(), d.slots.data(),     d.starts.data(), d.lengths.data(),
                             d.token_slots.data(), d.positions.data(), batch.sequences(), batch.tokens(), max_new};
    return d;
}

struct Heads {
    index_t nq, nkv, hd;
};

/// A ragged batch with its fused qkv rows and its caches. qkv is [tokens, stride] with
/// stride = (nq + 2 nkv) hd + pad: q, k, v are its column slices at 0, nq hd, (nq + nkv) hd.
/// before_k/v: the caches before the append (each sequence's prefix [0, start) random, every other
/// position NaN); k/v: after it (the new tokens' keys and values at their positions).
struct Scenario {
    Heads h;
    index_t slots = 0, capacity = 0, stride = 0;
    foe::Batch batch;
    std::vector<bfloat16> qkv, before_k, before_v, k, v;
    std::vector<float> qkv_f, k_f, v_f;  // float values for the oracle

    [[nodiscard]] std::size_t cache_at(index_t slot, index_t kvh, index_t pos) const
    {
        return sz(((slot * h.nkv + kvh) * capacity + pos) * h.hd);
    }
    [[nodiscard]] fc::AttentionShape shape() const { return {h.nq, h.nkv, h.hd, capacity}; }
};

Scenario make_scenario(Heads h, const std::vector<foe::SequenceChunk>& chunks, index_t slots, index_t capacity,
                       index_t pad, std::mt19937_64& rng)
{
    Scenario sc;
    sc.h = h;
    sc.slots = slots;
    sc.capacity = capacity;
    sc.stride = (h.nq + 2 * h.nkv) * h.hd + pad;
    sc.batch = foe::Batch(chunks);
    sc.batch.check_fits(slots, capacity);
    const index_t tokens = sc.batch.tokens();
    // q and k in [-2, 2): scores of a few units after the 1/sqrt(hd) scale, a softmax neither flat nor one-hot.
    const auto qkv = random_bf16(sz(tokens * sc.stride), rng, -2.0f, 2.0f);
    sc.qkv = qkv.bits;
    const auto cache_size = sz(slots * h.nkv * capacity * h.hd);
    sc.before_k.assign(cache_size, bfloat16::from_bits(nan_bits));
    sc.before_v = sc.before_k;
    for (const auto& c : chunks)
        for (index_t kvh = 0; kvh < h.nkv; ++kvh) {
            const auto prefix_k = random_bf16(sz(c.start * h.hd), rng, -2.0f, 2.0f);
            const auto prefix_v = random_bf16(sz(c.start * h.hd), rng);
            const auto at = static_cast<std::ptrdiff_t>(sc.cache_at(c.slot, kvh, 0));
            std::copy(prefix_k.bits.begin(), prefix_k.bits.end(), sc.before_k.begin() + at);
            std::copy(prefix_v.bits.begin(), prefix_v.bits.end(), sc.before_v.begin() + at);
        }
    sc.k = sc.before_k;
    sc.v = sc.before_v;
    for (index_t b = 0; b < sc.batch.sequences(); ++b) {
        const auto& c = chunks[sz(b)];
        for (index_t i = 0; i < c.length; ++i) {
            const index_t row = sc.batch.offset(b) + i;
            for (index_t kvh = 0; kvh < h.nkv; ++kvh)
                for (index_t d = 0; d < h.hd; ++d) {
                    const std::size_t at = sc.cache_at(c.slot, kvh, c.start + i) + sz(d);
                    sc.k[at] = sc.qkv[sz(row * sc.stride + (h.nq + kvh) * h.hd + d)];
                    sc.v[at] = sc.qkv[sz(row * sc.stride + (h.nq + h.nkv + kvh) * h.hd + d)];
                }
        }
    }
    sc.qkv_f = qkv.values;
    sc.k_f = to_float(sc.k);
    sc.v_f = to_float(sc.v);
    return sc;
}

/// Float64 causal GQA attention of every row: [tokens, nq, hd].
std::vector<double> oracle(const Scenario& sc)
{
    const auto [nq, nkv, hd] = sc.h;
    std::vector<double> out(sz(sc.batch.tokens() * nq * hd));
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    std::vector<double> p;
    for (index_t b = 0; b < sc.batch.sequences(); ++b) {
        const auto& c = sc.batch.chunks()[sz(b)];
        for (index_t i = 0; i < c.length; ++i) {
            const index_t row = sc.batch.offset(b) + i, pos = c.start + i;
            for (index_t head = 0; head < nq; ++head) {
                const index_t kvh = head / (nq / nkv);
                const float* q = &sc.qkv_f[sz(row * sc.stride + head * hd)];
                p.assign(sz(pos + 1), 0.0);
                double m = -std::numeric_limits<double>::infinity(), sum = 0.0;
                for (index_t j = 0; j <= pos; ++j) {
                    const float* k = &sc.k_f[sc.cache_at(c.slot, kvh, j)];
                    double dot = 0.0;
                    for (index_t d = 0; d < hd; ++d) dot += double{q[d]} * double{k[d]};
                    m = std::max(m, p[sz(j)] = dot * scale);
                }
                for (auto& x : p) sum += x = std::exp(x - m);
                double* o = &out[sz((row * nq + head) * hd)];
                for (index_t j = 0; j <= pos; ++j) {
                    const float* v = &sc.v_f[sc.cache_at(c.slot, kvh, j)];
                    for (index_t d = 0; d < hd; ++d) o[d] += p[sz(j)] * double{v[d]};
                }
                for (index_t d = 0; d < hd; ++d) o[d] /= sum;
            }
        }
    }
    return out;
}

/// The scenario on the device: its batch, fused qkv, and caches holding `before` (ready for append_kv).
struct DeviceScenario {
    DeviceBatchData batch;
    fc::DeviceBuffer<bfloat16> qkv, k, v;

    explicit DeviceScenario(const Scenario& sc)
        : batch(upload_batch(sc.batch)), qkv(fc::upload(sc.qkv)), k(fc::upload(sc.before_k)), v(fc::upload(sc.before_v))
    {
    }
    void append(const Scenario& sc)
    {
        fc::append_kv(batch.view, qkv.data() + sc.h.nq * sc.h.hd, qkv.data() + (sc.h.nq + sc.h.nkv) * sc.h.hd, sc.stride,
                      sc.h.nkv, sc.h.hd, sc.capacity, k.data(), v.data(), nullptr);
    }
};

/// Chunks with slots counted down from slots - 1 (not the identity).
std::vector<foe::SequenceChunk> chunks_from(const std::vector<std::pair<index_t, index_t>>& start_length, index_t slots)
{
    std::vector<foe::SequenceChunk> chunks;
    for (std::size_t b = 0; b < start_length.size(); ++b)
        chunks.push_back({slots - 1 - static_cast<index_t>(b), start_length[b].first, start_length[b].second});
    return chunks;
}

}  // namespace

TEST_CASE("cuda: append_kv writes each row's keys and values at its slot and position, bit-exactly")
{
    if (!have_device()) return;
    std::mt19937_64 rng(21);
    struct Case {
        Heads h;
        index_t pad;
    };
    // 16-byte vectors (hd % 8 == 0, aligned stride), single elements (hd 12; a stride of 4 mod 8).
    for (auto c : {Case{{2, 2, 8}, 0}, Case{{8, 2, 96}, 0}, Case{{4, 1, 12}, 0}, Case{{2, 1, 64}, 4}}) {
        CAPTURE(c.h.hd);
        CAPTURE(c.pad);
        const index_t slots = 6, capacity = 300;
        const auto chunks = chunks_from({{0, 1}, {3, 0}, {17, 200}, {0, 64}, {299, 1}}, slots);
        const Scenario sc = make_scenario(c.h, chunks, slots, capacity, c.pad, rng);
        DeviceScenario dev(sc);
        dev.append(sc);
        const auto k = fc::download(dev.k), v = fc::download(dev.v);
        CHECK(same_bits(k, sc.k));
        CHECK(same_bits(v, sc.v));
    }
}

TEST_CASE("cuda: causal prefill attention over a ragged batch matches a float64 GQA attention")
{
    if (!have_device()) return;
    std::mt19937_64 rng(22);
    struct Case {
        Heads h;
        index_t pad;
    };
    // Tensor-core kernel: hd 32 (GQA 4), 64 (1), 96 (1: foe-1b's group), 128 (2). Simple kernel:
    // hd 8 and 12, and hd 64 with a q stride that is not a multiple of 8 elements.
    const Case cases[] = {{{4, 1, 32}, 0}, {{2, 2, 64}, 0}, {{2, 2, 96}, 0}, {{4, 2, 128}, 0},
                          {{4, 2, 8}, 0},  {{4, 1, 12}, 0}, {{2, 1, 64}, 4}};
    for (const auto& c : cases) {
        CAPTURE(c.h.nq);
        CAPTURE(c.h.nkv);
        CAPTURE(c.h.hd);
        CAPTURE(c.pad);
        // New-token counts 1, 7, 64, 65, 200, 1000 and 0, from position 0 and after a cached prefix
        // (chunked prefill); the last sequence fills its slot to capacity.
        const index_t slots = 9, capacity = 1037;
        const auto chunks =
            chunks_from({{0, 1}, {5, 7}, {0, 64}, {130, 65}, {10, 0}, {0, 200}, {37, 1000}}, slots);
        const Scenario sc = make_scenario(c.h, chunks, slots, capacity, c.pad, rng);
        const auto want = oracle(sc);
        DeviceScenario dev(sc);
        dev.append(sc);
        CHECK(same_bits(fc::download(dev.k), sc.k));
        CHECK(same_bits(fc::download(dev.v), sc.v));

        fc::DeviceBuffer<bfloat16> out(want.size());
        std::vector<bfloat16> runs[2];
        for (auto& run : runs) {
            fc::fill_bytes(out, 0xff);
            fc::prefill_attention(sc.shape(), dev.batch.view, dev.qkv.data(), sc.stride, dev.k.data(), dev.v.data(),
                                  out.data(), nullptr);
            run = fc::download(out);
        }
        const double err = rel_error(to_float(runs[0]), want);
        CAPTURE(err);
        CHECK(err < bf16_tolerance);
        CHECK(same_bits(runs[0], runs[1]));

        // The dispatcher sends a batch of several tokens per sequence to the same kernel.
        fc::DeviceBuffer<unsigned char> ws(fc::attention_workspace_bytes(sc.shape(), sc.batch.sequences()));
        fc::fill_bytes(ws, 0xff);
        fc::fill_bytes(out, 0xff);
        fc::attention(sc.shape(), dev.batch.view, dev.qkv.data(), sc.stride, dev.k.data(), dev.v.data(), ws.data(),
                      out.data(), nullptr);
        CHECK(same_bits(fc::download(out), runs[0]));
    }
}

TEST_CASE("cuda: attention's decode path (split-KV) matches the prefill kernel on one-token batches")
{
    if (!have_device()) return;
    std::mt19937_64 rng(23);
    for (const auto h : {Heads{8, 2, 96}, Heads{4, 4, 128}, Heads{4, 2, 8}}) {
        CAPTURE(h.nq);
        CAPTURE(h.nkv);
        CAPTURE(h.hd);
        // Contexts 1, 2, 256, 257 (either side of the decode kernel's 256-position chunks), 701.
        const index_t slots = 7, capacity = 701;
        const auto chunks = chunks_from({{0, 1}, {1, 1}, {255, 1}, {256, 1}, {700, 1}}, slots);
        const Scenario sc = make_scenario(h, chunks, slots, capacity, 0, rng);
        const auto want = oracle(sc);
        DeviceScenario dev(sc);
        dev.append(sc);
        REQUIRE(dev.batch.view.max_new_tokens == 1);

        fc::DeviceBuffer<unsigned char> ws(fc::attention_workspace_bytes(sc.shape(), sc.batch.sequences()));
        fc::DeviceBuffer<bfloat16> out(want.size());
        std::vector<bfloat16> decode[2];
        for (auto& run : decode) {
            fc::fill_bytes(ws, 0xff);
            fc::fill_bytes(out, 0xff);
            // q read from the fused qkv rows: q_row_stride = (nq + 2 nkv) hd > nq hd.
            fc::attention(sc.shape(), dev.batch.view, dev.qkv.data(), sc.stride, dev.k.data(), dev.v.data(), ws.data(),
                          out.data(), nullptr);
            run = fc::download(out);
        }
        CHECK(same_bits(decode[0], decode[1]));
        CHECK(rel_error(to_float(decode[0]), want) < bf16_tolerance);

        fc::fill_bytes(out, 0xff);
        fc::prefill_attention(sc.shape(), dev.batch.view, dev.qkv.data(), sc.stride, dev.k.data(), dev.v.data(),
                              out.data(), nullptr);
        const auto prefill = fc::download(out);
        CHECK(rel_error(to_float(prefill), want) < bf16_tolerance);
        CHECK(rel_error(to_float(decode[0]), to_float(prefill)) < bf16_tolerance);

        // The same queries copied out contiguous ([sequences, nq, hd]) give the same bits.
        std::vector<bfloat16> q(sz(sc.batch.tokens() * h.nq * h.hd));
        for (index_t row = 0; row < sc.batch.tokens(); ++row)
            std::copy_n(sc.qkv.begin() + static_cast<std::ptrdiff_t>(row * sc.stride), h.nq * h.hd,
                        q.begin() + static_cast<std::ptrdiff_t>(row * h.nq * h.hd));
        const auto dq = fc::upload(q);
        fc::fill_bytes(ws, 0xff);
        fc::fill_bytes(out, 0xff);
        fc::attention(sc.shape(), dev.batch.view, dq.data(), h.nq * h.hd, dev.k.data(), dev.v.data(), ws.data(),
                      out.data(), nullptr);
        CHECK(same_bits(fc::download(out), decode[0]));
    }

    // At most one token per sequence but one sequence without any: not a pure decode step, so the
    // prefill kernel serves it (row b is no longer sequence b).
    const Heads h{4, 2, 64};
    const index_t slots = 4, capacity = 300;
    const Scenario sc = make_scenario(h, chunks_from({{12, 1}, {40, 0}, {299, 1}}, slots), slots, capacity, 0, rng);
    const auto want = oracle(sc);
    DeviceScenario dev(sc);
    dev.append(sc);
    fc::DeviceBuffer<unsigned char> ws(fc::attention_workspace_bytes(sc.shape(), sc.batch.sequences()));
    fc::DeviceBuffer<bfloat16> out(want.size());
    fc::fill_bytes(ws, 0xff);
    fc::fill_bytes(out, 0xff);
    fc::attention(sc.shape(), dev.batch.view, dev.qkv.data(), sc.stride, dev.k.data(), dev.v.data(), ws.data(),
                  out.data(), nullptr);
    CHECK(rel_error(to_float(fc::download(out)), want) < bf16_tolerance);
}

namespace {

/// A scenario's caches as a paged pool: each slot the batch uses gets the pages its sequence needs
/// ([0, start + length), pages of `page` positions), drawn from a shuffled pool so that a
/// sequence's pages are neither consecutive nor in order; the rest of each block-table row is -1,
/// and the pool holds `spare` pages nobody owns. Every pool row no sequence owns is NaN, so a
/// kernel that reads one (or writes one) shows.
struct PagedScenario {
    index_t page = 0, max_pages = 0, pages = 0;
    std::vector<std::int32_t> table;                  // [slots, max_pages]
    std::vector<bfloat16> before_k, before_v, k, v;  // pools [pages, nkv, page, hd]

    [[nodiscard]] fc::PagedKvLayout layout(const std::int32_t* device_table) const
    {
        return {static_cast<std::int32_t>(page), static_cast<std::int32_t>(max_pages), device_table, pages};
    }
};

PagedScenario make_paged(const Scenario& sc, index_t page, std::mt19937_64& rng, index_t spare = 3)
{
    PagedScenario ps;
    ps.page = page;
    ps.max_pages = (sc.capacity + page - 1) / page;
    std::vector<index_t> need(sz(sc.slots), 0);  // pages per slot
    for (const auto& c : sc.batch.chunks()) need[sz(c.slot)] = (c.start + c.length + page - 1) / page;
    for (const index_t n : need) ps.pages += n;
    ps.pages += spare;
    std::vector<std::int32_t> order(sz(ps.pages));
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<std::int32_t>(i);
    std::shuffle(order.begin(), order.end(), rng);
    ps.table.assign(sz(sc.slots * ps.max_pages), -1);
    // Hand out pages a round at a time over the slots (as a block manager growing them together).
    std::size_t next = 0;
    for (index_t i = 0; i < ps.max_pages; ++i)
        for (index_t s = 0; s < sc.slots; ++s)
            if (i < need[sz(s)]) ps.table[sz(s * ps.max_pages + i)] = order[next++];

    const auto pool_size = sz(ps.pages * sc.h.nkv * page * sc.h.hd);
    ps.before_k.assign(pool_size, bfloat16::from_bits(nan_bits));
    ps.before_v = ps.before_k;
    ps.k = ps.before_k;
    ps.v = ps.before_k;
    const auto hd = static_cast<std::ptrdiff_t>(sc.h.hd);
    for (index_t s = 0; s < sc.slots; ++s)
        for (index_t pos = 0; pos < need[sz(s)] * page && pos < sc.capacity; ++pos) {
            const index_t p = ps.table[sz(s * ps.max_pages + pos / page)];
            for (index_t kvh = 0; kvh < sc.h.nkv; ++kvh) {
                const auto from = static_cast<std::ptrdiff_t>(sc.cache_at(s, kvh, pos));
                const auto to = static_cast<std::ptrdiff_t>(((p * sc.h.nkv + kvh) * page + pos % page) * sc.h.hd);
                std::copy_n(sc.before_k.begin() + from, hd, ps.before_k.begin() + to);
                std::copy_n(sc.before_v.begin() + from, hd, ps.before_v.begin() + to);
                std::copy_n(sc.k.begin() + from, hd, ps.k.begin() + to);
                std::copy_n(sc.v.begin() + from, hd, ps.v.begin() + to);
            }
        }
    return ps;
}

/// A paged scenario on the device: its block table and pools holding `before`.
struct DevicePaged {
    fc::DeviceBuffer<std::int32_t> table;
    fc::DeviceBuffer<bfloat16> k, v;
    fc::PagedKvLayout layout;

    explicit DevicePaged(const PagedScenario& ps)
        : table(fc::upload(ps.table)), k(fc::upload(ps.before_k)), v(fc::upload(ps.before_v)), layout(ps.layout(table.data()))
    {
    }
    void append(const Scenario& sc, const DeviceScenario& dev)
    {
        fc::append_kv(dev.batch.view, dev.qkv.data() + sc.h.nq * sc.h.hd, dev.qkv.data() + (sc.h.nq + sc.h.nkv) * sc.h.hd,
                      sc.stride, sc.h.nkv, sc.h.hd, layout, k.data(), v.data(), nullptr);
    }
};

}  // namespace

TEST_CASE("cuda: paged append_kv and prefill attention equal the contiguous kernels bit for bit, pages of 1, 16 and 5")
{
    if (!have_device()) return;
    std::mt19937_64 rng(24);
    struct Case {
        Heads h;
        index_t pad;
    };
    // Tensor-core kernel at hd 64 (GQA 2) and 128 (GQA 2); the simple kernel at hd 8 and at hd 64
    // with a q stride that is not a multiple of 8 elements (16-byte vectors in append_kv at hd 8,
    // single elements at hd 12).
    const Case cases[] = {{{4, 2, 64}, 0}, {{4, 2, 128}, 0}, {{4, 2, 8}, 0}, {{4, 1, 12}, 0}, {{2, 1, 64}, 4}};
    for (const auto& c : cases)
        for (const index_t page : {1, 16, 5}) {
            CAPTURE(c.h.nq);
            CAPTURE(c.h.nkv);
            CAPTURE(c.h.hd);
            CAPTURE(c.pad);
            CAPTURE(page);
            // Ragged: one token, a chunk after a cached prefix, a tile and one past it, an empty
            // sequence, a long prompt over many pages and one that fills its slot to capacity.
            const index_t slots = 8, capacity = 613;
            const auto chunks = chunks_from({{0, 1}, {5, 7}, {0, 64}, {130, 65}, {10, 0}, {0, 300}, {13, 600}}, slots);
            const Scenario sc = make_scenario(c.h, chunks, slots, capacity, c.pad, rng);
            const PagedScenario ps = make_paged(sc, page, rng);
            DeviceScenario dev(sc);
            dev.append(sc);
            DevicePaged paged(ps);
            paged.append(sc, dev);
            // Every row lands in its page; rows of pages nobody owns, and the unused tail of each
            // slot's last page, stay NaN.
            CHECK(same_bits(fc::download(paged.k), ps.k));
            CHECK(same_bits(fc::download(paged.v), ps.v));

            fc::DeviceBuffer<bfloat16> out(sz(sc.batch.tokens() * c.h.nq * c.h.hd));
            fc::fill_bytes(out, 0xff);
            fc::prefill_attention(sc.shape(), dev.batch.view, dev.qkv.data(), sc.stride, dev.k.data(), dev.v.data(),
                                  out.data(), nullptr);
            const auto contiguous = fc::download(out);
            CHECK(std::all_of(contiguous.begin(), contiguous.end(), [](bfloat16 x) { return std::isfinite(static_cast<float>(x)); }));
            std::vector<bfloat16> runs[2];
            for (auto& run : runs) {
                fc::fill_bytes(out, 0xff);
                fc::prefill_attention(sc.shape(), paged.layout, dev.batch.view, dev.qkv.data(), sc.stride, paged.k.data(),
                                      paged.v.data(), out.data(), nullptr);
                run = fc::download(out);
            }
            CHECK(same_bits(runs[0], contiguous));
            CHECK(same_bits(runs[0], runs[1]));

            // The dispatcher's prefill path with the layout.
            fc::DeviceBuffer<unsigned char> ws(fc::attention_workspace_bytes(sc.shape(), sc.batch.sequences()));
            fc::fill_bytes(ws, 0xff);
            fc::fill_bytes(out, 0xff);
            fc::attention(sc.shape(), paged.layout, dev.batch.view, dev.qkv.data(), sc.stride, paged.k.data(),
                          paged.v.data(), ws.data(), out.data(), nullptr);
            CHECK(same_bits(fc::download(out), contiguous));
        }
}

TEST_CASE("cuda: paged decode attention equals the contiguous decode bit for bit, pages of 1, 16 and 5")
{
    if (!have_device()) return;
    std::mt19937_64 rng(25);
    for (const auto h : {Heads{8, 2, 96}, Heads{4, 4, 128}, Heads{4, 2, 8}})
        for (const index_t page : {1, 16, 5}) {
            CAPTURE(h.nq);
            CAPTURE(h.nkv);
            CAPTURE(h.hd);
            CAPTURE(page);
            // Contexts 1, 2, 256, 257 (either side of the decode kernel's 256-position chunks), 701.
            const index_t slots = 7, capacity = 701;
            const auto chunks = chunks_from({{0, 1}, {1, 1}, {255, 1}, {256, 1}, {700, 1}}, slots);
            const Scenario sc = make_scenario(h, chunks, slots, capacity, 0, rng);
            const PagedScenario ps = make_paged(sc, page, rng);
            DeviceScenario dev(sc);
            dev.append(sc);
            DevicePaged paged(ps);
            paged.append(sc, dev);
            CHECK(same_bits(fc::download(paged.k), ps.k));
            CHECK(same_bits(fc::download(paged.v), ps.v));

            fc::DeviceBuffer<unsigned char> ws(fc::attention_workspace_bytes(sc.shape(), sc.batch.sequences()));
            fc::DeviceBuffer<bfloat16> out(sz(sc.batch.tokens() * h.nq * h.hd));
            fc::fill_bytes(ws, 0xff);
            fc::fill_bytes(out, 0xff);
            fc::attention(sc.shape(), dev.batch.view, dev.qkv.data(), sc.stride, dev.k.data(), dev.v.data(), ws.data(),
                          out.data(), nullptr);
            const auto contiguous = fc::download(out);
            CHECK(rel_error(to_float(contiguous), oracle(sc)) < bf16_tolerance);
            std::vector<bfloat16> runs[2];
            for (auto& run : runs) {
                fc::fill_bytes(ws, 0xff);
                fc::fill_bytes(out, 0xff);
                fc::attention(sc.shape(), paged.layout, dev.batch.view, dev.qkv.data(), sc.stride, paged.k.data(),
                              paged.v.data(), ws.data(), out.data(), nullptr);
                run = fc::download(out);
            }
            CHECK(same_bits(runs[0], contiguous));
            CHECK(same_bits(runs[0], runs[1]));

            // The split-KV kernel called directly, and the prefill kernels on the same one-token
            // rows, paged against contiguous.
            fc::fill_bytes(out, 0xff);
            fc::decode_attention(fc::DecodeAttentionShape{sc.batch.sequences(), h.nq, h.nkv, h.hd, capacity}, paged.layout,
                                 dev.qkv.data(), sc.stride, paged.k.data(), paged.v.data(), dev.batch.slots.data(),
                                 dev.batch.lengths.data(), ws.data(), out.data(), nullptr);
            CHECK(same_bits(fc::download(out), contiguous));
            fc::fill_bytes(out, 0xff);
            fc::prefill_attention(sc.shape(), dev.batch.view, dev.qkv.data(), sc.stride, dev.k.data(), dev.v.data(),
                                  out.data(), nullptr);
            const auto prefill = fc::download(out);
            fc::fill_bytes(out, 0xff);
            fc::prefill_attention(sc.shape(), paged.layout, dev.batch.view, dev.qkv.data(), sc.stride, paged.k.data(),
                                  paged.v.data(), out.data(), nullptr);
            CHECK(same_bits(fc::download(out), prefill));
        }
}

TEST_CASE("cuda: a captured paged decode step replays with a block table rewritten in place")
{
    if (!have_device()) return;
    std::mt19937_64 rng(26);
    const Heads h{4, 2, 64};
    const index_t slots = 4, capacity = 300, page = 16;
    const Scenario sc = make_scenario(h, chunks_from({{40, 1}, {0, 1}, {299, 1}}, slots), slots, capacity, 0, rng);
    const PagedScenario first = make_paged(sc, page, rng);
    const PagedScenario second = make_paged(sc, page, rng, 5);  // other pages, a larger pool
    DeviceScenario dev(sc);
    dev.append(sc);
    fc::DeviceBuffer<unsigned char> ws(fc::attention_workspace_bytes(sc.shape(), sc.batch.sequences()));
    fc::DeviceBuffer<bfloat16> out(sz(sc.batch.tokens() * h.nq * h.hd));
    fc::attention(sc.shape(), dev.batch.view, dev.qkv.data(), sc.stride, dev.k.data(), dev.v.data(), ws.data(),
                  out.data(), nullptr);
    const auto contiguous = fc::download(out);

    // Buffers sized for the larger pool; the graph holds their addresses and the layout's pool
    // size, so the layout names the larger pool from the start.
    const auto pool_size = std::max(first.k.size(), second.k.size());
    fc::DeviceBuffer<std::int32_t> table(first.table.size());
    fc::DeviceBuffer<bfloat16> k(pool_size), v(pool_size);
    const fc::PagedKvLayout layout{static_cast<std::int32_t>(page), static_cast<std::int32_t>(first.max_pages),
                                   table.data(), std::max(first.pages, second.pages)};
    fc::Stream stream;
    const auto load = [&](const PagedScenario& ps) {
        fc::fill_bytes(k, 0xff, stream.get());
        fc::fill_bytes(v, 0xff, stream.get());
        fc::check(cudaMemcpyAsync(table.data(), ps.table.data(), ps.table.size() * sizeof(std::int32_t),
                                  cudaMemcpyHostToDevice, stream.get()), "table");
        fc::check(cudaMemcpyAsync(k.data(), ps.k.data(), ps.k.size() * sizeof(bfloat16), cudaMemcpyHostToDevice,
                                  stream.get()), "keys");
        fc::check(cudaMemcpyAsync(v.data(), ps.v.data(), ps.v.size() * sizeof(bfloat16), cudaMemcpyHostToDevice,
                                  stream.get()), "values");
        fc::check(cudaStreamSynchronize(stream.get()), "cudaStreamSynchronize");
    };
    load(first);

    cudaGraph_t graph = nullptr;
    fc::check(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    fc::attention(sc.shape(), layout, dev.batch.view, dev.qkv.data(), sc.stride, k.data(), v.data(), ws.data(),
                  out.data(), stream.get());
    fc::check(cudaStreamEndCapture(stream.get(), &graph), "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    fc::check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");

    for (const PagedScenario* ps : {&first, &second, &first}) {
        load(*ps);
        fc::fill_bytes(out, 0xff, stream.get());
        fc::check(cudaGraphLaunch(exec, stream.get()), "cudaGraphLaunch");
        CHECK(same_bits(fc::download(out, stream.get()), contiguous));
    }
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
}

TEST_CASE("cuda: positions without a page are neither written nor read")
{
    if (!have_device()) return;
    std::mt19937_64 rng(27);
    const Heads h{4, 2, 64};
    const index_t slots = 3, capacity = 200, page = 16;
    // One token per sequence at positions 40, 100 and 150; the page holding each sequence's new
    // token is then taken out of its table row (-1), and slot 2's first entry names a page past
    // the pool.
    const Scenario sc = make_scenario(h, chunks_from({{40, 1}, {100, 1}, {150, 1}}, slots), slots, capacity, 0, rng);
    PagedScenario ps = make_paged(sc, page, rng);
    for (const auto& c : sc.batch.chunks()) {
        std::int32_t& entry = ps.table[sz(c.slot * ps.max_pages + c.start / page)];
        // The page stays in the pool, untouched: NaN where the new rows would have gone.
        for (index_t kvh = 0; kvh < h.nkv; ++kvh) {
            const auto at = static_cast<std::ptrdiff_t>(((entry * h.nkv + kvh) * page + c.start % page) * h.hd);
            std::copy_n(ps.before_k.begin() + at, h.hd, ps.k.begin() + at);
            std::copy_n(ps.before_v.begin() + at, h.hd, ps.v.begin() + at);
        }
        entry = -1;
    }
    ps.table[sz((slots - 1) * ps.max_pages)] = static_cast<std::int32_t>(ps.pages);  // slot 2, page 0: past the pool
    DeviceScenario dev(sc);
    DevicePaged paged(ps);
    paged.append(sc, dev);
    CHECK(same_bits(fc::download(paged.k), ps.k));
    CHECK(same_bits(fc::download(paged.v), ps.v));

    // Attention over what is mapped: finite (no NaN row read), the same from both kernels' paths.
    fc::DeviceBuffer<unsigned char> ws(fc::attention_workspace_bytes(sc.shape(), sc.batch.sequences()));
    fc::DeviceBuffer<bfloat16> out(sz(sc.batch.tokens() * h.nq * h.hd));
    fc::fill_bytes(ws, 0xff);
    fc::fill_bytes(out, 0xff);
    fc::attention(sc.shape(), paged.layout, dev.batch.view, dev.qkv.data(), sc.stride, paged.k.data(), paged.v.data(),
                  ws.data(), out.data(), nullptr);
    const auto decode = fc::download(out);
    CHECK(std::all_of(decode.begin(), decode.end(), [](bfloat16 x) { return std::isfinite(static_cast<float>(x)); }));
    fc::fill_bytes(out, 0xff);
    fc::prefill_attention(sc.shape(), paged.layout, dev.batch.view, dev.qkv.data(), sc.stride, paged.k.data(),
                          paged.v.data(), out.data(), nullptr);
    const auto prefill = fc::download(out);
    CHECK(std::all_of(prefill.begin(), prefill.end(), [](bfloat16 x) { return std::isfinite(static_cast<float>(x)); }));
    CHECK(rel_error(to_float(decode), to_float(prefill)) < bf16_tolerance);
}

// Argument checks throw before any CUDA call, so this case runs without a device too.
TEST_CASE("cuda: attention and append_kv reject bad shapes with foe::InvalidArgument")
{
    const fc::DeviceBatch batch{};  // empty: nothing would run
    const fc::AttentionShape good{8, 2, 64, 128};
    CHECK_NOTHROW(fc::prefill_attention(good, batch, nullptr, 8 * 64, nullptr, nullptr, nullptr, nullptr));
    CHECK_THROWS_AS(fc::prefill_attention({6, 4, 64, 128}, batch, nullptr, 6 * 64, nullptr, nullptr, nullptr, nullptr),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(fc::prefill_attention({8, 2, 300, 128}, batch, nullptr, 8 * 300, nullptr, nullptr, nullptr, nullptr),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(fc::prefill_attention(good, batch, nullptr, 8 * 64 - 1, nullptr, nullptr, nullptr, nullptr),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(fc::prefill_attention({8, 2, 64, 0}, batch, nullptr, 8 * 64, nullptr, nullptr, nullptr, nullptr),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(fc::append_kv(batch, nullptr, nullptr, 2 * 64 - 1, 2, 64, 128, nullptr, nullptr, nullptr),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(fc::append_kv(batch, nullptr, nullptr, 0, 0, 64, 128, nullptr, nullptr, nullptr), foe::InvalidArgument);
    // Paged layouts are checked too: a page size of 0, a missing table, positions past int32.
    const std::int32_t table[4] = {0, 1, 2, 3};
    const fc::PagedKvLayout paged{16, 4, table, 4};
    CHECK_NOTHROW(fc::append_kv(batch, nullptr, nullptr, 2 * 64, 2, 64, paged, nullptr, nullptr, nullptr));
    CHECK_NOTHROW(fc::prefill_attention(good, paged, batch, nullptr, 8 * 64, nullptr, nullptr, nullptr, nullptr));
    CHECK_THROWS_WITH_AS(fc::append_kv(batch, nullptr, nullptr, 2 * 64, 2, 64, fc::PagedKvLayout{0, 4, table, 4}, nullptr,
                                       nullptr, nullptr),
                         doctest::Contains("append_kv: KV page size 0 must be positive"), foe::InvalidArgument);
    CHECK_THROWS_WITH_AS(fc::prefill_attention(good, fc::PagedKvLayout{16, 4, nullptr, 4}, batch, nullptr, 8 * 64, nullptr,
                                               nullptr, nullptr, nullptr),
                         doctest::Contains("needs a block table"), foe::InvalidArgument);
    CHECK_THROWS_WITH_AS(fc::decode_attention(fc::DecodeAttentionShape{0, 8, 2, 64, 128},
                                              fc::PagedKvLayout{1 << 16, 1 << 16, table, 4}, nullptr, 8 * 64, nullptr,
                                              nullptr, nullptr, nullptr, nullptr, nullptr, nullptr),
                         doctest::Contains("exceed the 2^31 - 1 positions"), foe::InvalidArgument);
    try {
        fc::prefill_attention({8, 2, 300, 128}, batch, nullptr, 8 * 300, nullptr, nullptr, nullptr, nullptr);
    } catch (const foe::InvalidArgument& e) {
        CHECK(std::string(e.what()).find("head_dim 300") != std::string::npos);
    }
}
