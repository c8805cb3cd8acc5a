// foe's device attention against a float64 GQA attention over ragged batches: the KV-cache
// append (bit-exact), causal prefill (tensor-core kernel at head_dim 32/64/96/128, the simple
// kernel otherwise), and the dispatcher's decode path against the prefill kernel. Inputs are bf16;
// the oracle computes in float64 on the same bf16 values. Outputs and workspaces are poisoned
// (0xff bytes: NaN in bf16) before every run, cache positions no row may see hold NaN, and every
// kernel runs twice and must give the same bits. Then the group-batched attention policy
// (foe/attention/gqa_attention.cuh): host replays of its kernels' folded-group index rules, and on
// the device its output and caches against the per-group kernels (bit for bit) and the host
// GqaAttention (bf16 tolerance), with the batched GEMM entry point it runs.
// Without a CUDA device every device test case says so and passes.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

// The host GqaAttention oracle below runs foe's own GEMM (gemm::Default), not CBLAS; OpenBLAS's
// headers would declare a global ::bfloat16 that makes this file's unqualified bfloat16 ambiguous.
#undef FOE_WITH_CBLAS

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_test_util.hpp"
#include "foe/attention/decode_attention.cuh"
#include "foe/attention/gqa_attention.cuh"
#include "foe/attention/gqa_attention.hpp"
#include "foe/attention/kv_append.cuh"
#include "foe/attention/kv_layout.cuh"
#include "foe/attention/prefill_attention.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/groups.cuh"
#include "foe/cuda/stream.cuh"
#include "foe/layer/batch.hpp"
#include "foe/ops/rmsnorm.cuh"
#include "foe/ops/rope.cuh"

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

// ---------------------------------------------------------------------------------------------
// Grouped launches (foe/cuda/groups.cuh, foe/attention/gqa_attention.cuh): one launch covers the
// G groups of a layer. Host replays of the kernels' index rules: every (group, token, head) a
// grouped launch touches is the element the per-group launch of that group touches, in the
// buffers laid out as CudaGqaAttention lays them out, and no two groups touch the same element.
// These run without a GPU.

namespace {

/// What one (group, row, query head) of an attention kernel reads and writes, in elements of the
/// q|k|v scratch, the output and the group-stacked caches; the cache offset is that of the row's
/// first key (position 0) of its KV head.
struct Touch {
    std::int64_t q = 0, out = 0, cache = 0;
    int kv_head = 0;
    bool operator==(const Touch&) const = default;
};

struct ReplayShape {
    index_t groups, qh, kvh, hd, tokens, streams;
    bool shared_norm;
    [[nodiscard]] index_t qw() const { return qh * hd; }
    [[nodiscard]] index_t row() const { return (qh + 2 * kvh) * hd; }
};

/// The per-group reference: group g's own launch (groups = 1, strides 0) on its own buffers,
/// placed where CudaGqaAttention puts group g's: its q|k|v at plan.qkv_at(g, 0, 0) with the
/// plan's row stride, its output block at g T qw, its cache at g per_cache.
template <class Layout>
Touch per_group(const ReplayShape& s, const foe::attention::GqaGroupPlan& plan, const Layout& layout, index_t per_cache,
                int g, long long row, int h, int slot)
{
    const int kvh = h / static_cast<int>(s.qh / s.kvh);
    return {plan.qkv_at(g, 0, 0) + row * plan.qkv_row + h * s.hd, g * s.tokens * s.qw() + (row * s.qh + h) * s.hd,
            g * per_cache + layout.offset(slot, kvh, 0, static_cast<int>(s.kvh), static_cast<int>(s.hd)), kvh};
}

}  // namespace

TEST_CASE("grouped attention launches: the folded index rules replay the per-group launches")
{
    namespace fa = foe::attention;
    namespace dp = foe::cuda::detail::prefill;
    namespace dd = foe::cuda::detail::decode;
    const index_t slots = 3, capacity = 40, page = 16, width = (capacity + page - 1) / page;
    // A block table shared by every group: slot s's pages, in an order that is not the identity.
    std::vector<std::int32_t> table(sz(slots * width));
    for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<std::int32_t>((i * 5 + 2) % table.size());
    const index_t pool = slots * width;
    int cases = 0;
    for (const index_t groups : {1, 2, 4, 16})
        for (const auto& heads_pair : {std::pair<index_t, index_t>{1, 1}, {2, 1}, {2, 2}})
            for (const index_t streams : {index_t{1}, groups})
                for (const bool shared_norm : {true, false})
                    for (const bool paged : {false, true}) {
                        const index_t qh = heads_pair.first, kvh = heads_pair.second;
                        const ReplayShape s{groups, qh, kvh, 16, 7, streams, shared_norm};
                        CAPTURE(groups);
                        CAPTURE(qh);
                        CAPTURE(kvh);
                        CAPTURE(streams);
                        CAPTURE(shared_norm);
                        CAPTURE(paged);
                        ++cases;
                        const index_t d = 24, row = s.row(), t = s.tokens, g_count = s.groups;
                        const auto plan = fa::GqaGroupPlan::make(g_count, row, t, d, streams, shared_norm);
                        CHECK(plan.fused == (streams == 1 && shared_norm));

                        // The q|k|v scratch: the GEMM writes element (t, n) of [T, G row] (one
                        // GEMM over the stacked weights: n = g row + c) or of batch g's [T, row]
                        // at g T row (the batched GEMM); the plan must name those elements, and
                        // they must tile [0, G T row) exactly once.
                        std::vector<int> hits(sz(g_count * t * row), 0);
                        for (index_t g = 0; g < g_count; ++g)
                            for (index_t tok = 0; tok < t; ++tok)
                                for (index_t c = 0; c < row; ++c) {
                                    const index_t gemm_at = plan.fused ? tok * (g_count * row) + g * row + c
                                                                       : g * (t * row) + tok * row + c;
                                    REQUIRE(plan.qkv_at(g, tok, c) == gemm_at);
                                    ++hits[sz(gemm_at)];
                                }
                        CHECK(std::all_of(hits.begin(), hits.end(), [](int n) { return n == 1; }));

                        const fc::GroupStrides rows{static_cast<int>(g_count), plan.qkv_group, plan.qkv_group, 0, 0};
                        // Per-head QK-norm of q (one launch): block b of group g (gridDim.y) normalises
                        // the hd elements at g in + rms_norm_row(b); they must be q head b % qh of
                        // token b / qh of group g. The same for k at column qw.
                        for (index_t g = 0; g < g_count; ++g)
                            for (unsigned b = 0; b < static_cast<unsigned>(t * qh); ++b) {
                                const auto at = fc::GroupStrides::at(rows.in, static_cast<int>(g)) +
                                                static_cast<std::int64_t>(fc::detail::rms_norm_row(
                                                    b, static_cast<int>(qh), static_cast<int>(s.hd),
                                                    static_cast<std::size_t>(plan.qkv_row)));
                                REQUIRE(at == plan.qkv_at(g, b / qh, (b % qh) * s.hd));
                            }
                        // Full-width QK-norm: one part of qw per token.
                        for (index_t g = 0; g < g_count; ++g)
                            for (unsigned b = 0; b < static_cast<unsigned>(t); ++b)
                                REQUIRE(fc::GroupStrides::at(rows.in, static_cast<int>(g)) +
                                            static_cast<std::int64_t>(fc::detail::rms_norm_row(
                                                b, 1, static_cast<int>(s.qw()), static_cast<std::size_t>(plan.qkv_row))) ==
                                        plan.qkv_at(g, b, 0));
                        // RoPE over qh + kvh heads from q: head h of token tok of group g is q head h
                        // (h < qh) or k head h - qh, never v.
                        for (index_t g = 0; g < g_count; ++g)
                            for (index_t tok = 0; tok < t; ++tok)
                                for (index_t h = 0; h < qh + kvh; ++h) {
                                    const auto at = fc::GroupStrides::at(rows.in, static_cast<int>(g)) +
                                                    tok * plan.qkv_row + h * s.hd;
                                    REQUIRE(at == plan.qkv_at(g, tok, h * s.hd));
                                    REQUIRE(h * s.hd + s.hd <= s.qw() + kvh * s.hd);
                                }
                        // append_kv: group g copies k row element e from k + g in + tok stride + e.
                        for (index_t g = 0; g < g_count; ++g)
                            for (index_t tok = 0; tok < t; ++tok)
                                for (index_t e = 0; e < kvh * s.hd; ++e) {
                                    const auto k_at = s.qw() + fc::GroupStrides::at(rows.in, static_cast<int>(g)) +
                                                      tok * plan.qkv_row + e;
                                    REQUIRE(k_at == plan.qkv_at(g, tok, s.qw() + e));
                                    REQUIRE(k_at + kvh * s.hd == plan.qkv_at(g, tok, s.qw() + kvh * s.hd + e));
                                }

                        // Attention over the group-stacked caches.
                        const auto check_attention = [&](const auto& layout, index_t per_cache) {
                            fc::GroupStrides at = rows;
                            at.cache = per_cache;
                            at.out = t * s.qw();
                            std::vector<Touch> folded_simple, folded_mma, folded_decode, reference;
                            const int slot = static_cast<int>(slots - 1);
                            for (index_t g = 0; g < g_count; ++g)
                                for (index_t r = 0; r < t; ++r)
                                    for (index_t h = 0; h < qh; ++h)
                                        reference.push_back(per_group(s, plan, layout, per_cache, static_cast<int>(g), r,
                                                                      static_cast<int>(h), slot));
                            const int heads = static_cast<int>(qh);
                            // Simple prefill kernel: one warp per work item over T x G x qh.
                            std::vector<Touch> by_key(reference.size());
                            std::vector<int> seen(reference.size(), 0);
                            for (long long work = 0; work < t * g_count * qh; ++work) {
                                const auto w = dp::simple_work(work, heads, static_cast<int>(g_count));
                                const auto a = dp::grouped_row_head(at, heads, w.folded, w.row, plan.qkv_row,
                                                                    static_cast<int>(s.hd));
                                const int kv = a.head / (heads / static_cast<int>(kvh));
                                const std::size_t key = sz((a.group * t + w.row) * qh + a.head);
                                by_key[key] = {a.q, a.out,
                                               a.cache + layout.offset(slot, kv, 0, static_cast<int>(kvh),
                                                                       static_cast<int>(s.hd)),
                                               kv};
                                ++seen[key];
                            }
                            CHECK(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
                            CHECK(by_key == reference);
                            // Tensor-core prefill kernel: blockIdx.y = folded head; group base pointers
                            // first, then the kernel's own row / head arithmetic.
                            for (index_t g = 0; g < g_count; ++g)
                                for (index_t r = 0; r < t; ++r)
                                    for (int h = 0; h < heads; ++h) {
                                        const int y = fc::HeadFold{heads}.fold(static_cast<int>(g), h);
                                        const auto a0 = dp::grouped_row_head(at, heads, y, 0, 0, static_cast<int>(s.hd));
                                        REQUIRE(a0.group == g);
                                        REQUIRE(a0.head == h);
                                        const int kv = a0.head / (heads / static_cast<int>(kvh));
                                        folded_mma.push_back(
                                            {fc::GroupStrides::at(at.in, a0.group) + r * plan.qkv_row + a0.head * s.hd,
                                             fc::GroupStrides::at(at.out, a0.group) + (r * qh + a0.head) * s.hd,
                                             a0.cache + layout.offset(slot, kv, 0, static_cast<int>(kvh),
                                                                      static_cast<int>(s.hd)),
                                             kv});
                                    }
                            CHECK(folded_mma == reference);
                            // Split-KV decode: row b is sequence b; blockIdx.y (pass 1) and blockIdx.x
                            // (pass 2) the folded head; partials of every (b, folded head, chunk)
                            // disjoint and inside the workspace of G groups.
                            const int chunks = 3;
                            const int folded_heads = static_cast<int>(g_count * qh);
                            std::vector<int> ws(sz(t * folded_heads * chunks * (s.hd + 2)), 0);
                            const fc::DecodeAttentionShape ds{t, qh, kvh, s.hd, 3 * fc::DecodeAttentionLaunch::chunk};
                            CHECK(fc::decode_attention_workspace_bytes(ds, g_count) == ws.size() * sizeof(float));
                            for (int b = 0; b < static_cast<int>(t); ++b)
                                for (int y = 0; y < folded_heads; ++y) {
                                    const fc::HeadFold fold{heads};
                                    const int g = fold.group(y), h = fold.head(y);
                                    for (int c = 0; c < chunks; ++c) {
                                        const auto p = dd::partial_at(b, y, c, folded_heads, chunks, static_cast<int>(s.hd));
                                        for (std::size_t j = 0; j < sz(s.hd + 2); ++j) ++ws.at(p + j);
                                    }
                                    const int kv = h / (heads / static_cast<int>(kvh));
                                    folded_decode.push_back(
                                        {dd::q_at(at, g, b, h, plan.qkv_row, static_cast<int>(s.hd)),
                                         dd::out_at(at, g, b, h, heads, static_cast<int>(s.hd)),
                                         fc::GroupStrides::at(at.cache, g) +
                                             layout.offset(slot, kv, 0, static_cast<int>(kvh), static_cast<int>(s.hd)),
                                         kv});
                                }
                            CHECK(std::all_of(ws.begin(), ws.end(), [](int n) { return n == 1; }));
                            // Decode touches are ordered (b, g, h); the reference (g, row, h).
                            std::vector<Touch> reordered;
                            for (index_t b = 0; b < t; ++b)
                                for (index_t g = 0; g < g_count; ++g)
                                    for (index_t h = 0; h < qh; ++h) reordered.push_back(reference[sz((g * t + b) * qh + h)]);
                            CHECK(folded_decode == reordered);
                            // Every group's cache rows stay inside its own cache.
                            for (index_t g = 0; g < g_count; ++g)
                                for (int sl = 0; sl < static_cast<int>(slots); ++sl)
                                    for (int kv = 0; kv < static_cast<int>(kvh); ++kv)
                                        for (int pos = 0; pos < static_cast<int>(capacity); ++pos) {
                                            const auto o = layout.offset(sl, kv, pos, static_cast<int>(kvh),
                                                                         static_cast<int>(s.hd));
                                            REQUIRE(o >= 0);
                                            const auto a = fc::GroupStrides::at(at.cache, static_cast<int>(g)) + o;
                                            REQUIRE(a >= g * per_cache);
                                            REQUIRE(a + s.hd <= (g + 1) * per_cache);
                                        }
                        };
                        if (paged)
                            check_attention(fc::PagedKvLayout{static_cast<std::int32_t>(page),
                                                              static_cast<std::int32_t>(width), table.data(), pool},
                                            pool * kvh * page * s.hd);
                        else
                            check_attention(fc::ContiguousKvLayout{static_cast<std::int32_t>(capacity)},
                                            slots * kvh * capacity * s.hd);
                    }
    CHECK(cases == 4 * 3 * 2 * 2 * 2);
}

// ---------------------------------------------------------------------------------------------
// CudaGqaAttention on the device: G = 1, 2, 4 groups, 1 and G input streams, contiguous and paged
// caches, prefill, decode and a chunked prefill in turn. With TcGemm (sums independent of N and
// the batch) the output and the caches equal, bit for bit, the per-group kernels run group by
// group as cuda::Layer ran them; with either GEMM the output equals the host GqaAttention of each
// group within bf16 tolerance.

namespace {

namespace fa = foe::attention;

struct GqaCase {
    index_t d, qh, kvh, hd;
    foe::QkNorm qk_norm;
    bool shared_norm;
};

/// Random bf16-exact host weights of G groups, and their AttentionWeights views.
struct GqaModel {
    fa::AttentionSpec spec;
    index_t groups = 0;
    std::vector<std::vector<float>> norm, q, k, v, o, qn, kn;
    std::vector<fa::AttentionWeights> views;

    [[nodiscard]] index_t qw() const { return spec.q_heads * spec.head_dim; }
    [[nodiscard]] index_t kw() const { return spec.kv_heads * spec.head_dim; }
    [[nodiscard]] index_t row() const { return qw() + 2 * kw(); }
};

GqaModel make_gqa_model(const GqaCase& c, index_t groups, std::mt19937_64& rng)
{
    GqaModel m;
    m.groups = groups;
    m.spec.hidden_size = c.d;
    m.spec.q_heads = c.qh;
    m.spec.kv_heads = c.kvh;
    m.spec.head_dim = c.hd;
    m.spec.qk_norm = c.qk_norm;
    m.spec.rms_norm_eps = 1e-5f;
    m.spec.rope_theta = 10000.0;
    m.spec.cache_slots = 3;
    m.spec.cache_capacity = 80;
    m.spec.page_size = 16;
    m.spec.cache_pages = 0;
    m.spec.max_tokens = 128;
    m.spec.max_sequences = 4;
    const index_t qn = c.qk_norm == foe::QkNorm::per_head ? c.hd : c.qk_norm == foe::QkNorm::full_width ? m.qw() : 0;
    const index_t kn = c.qk_norm == foe::QkNorm::per_head ? c.hd : c.qk_norm == foe::QkNorm::full_width ? m.kw() : 0;
    const auto values = [&](index_t n, float lo, float hi) { return random_bf16(sz(n), rng, lo, hi).values; };
    const auto shared = values(c.d, 0.5f, 1.5f);
    for (index_t g = 0; g < groups; ++g) {
        m.norm.push_back(c.shared_norm ? shared : values(c.d, 0.5f, 1.5f));
        m.q.push_back(values(m.qw() * c.d, -0.25f, 0.25f));
        m.k.push_back(values(m.kw() * c.d, -0.25f, 0.25f));
        m.v.push_back(values(m.kw() * c.d, -0.25f, 0.25f));
        m.o.push_back(values(c.d * m.qw(), -0.25f, 0.25f));
        m.qn.push_back(values(qn, 0.5f, 1.5f));
        m.kn.push_back(values(kn, 0.5f, 1.5f));
    }
    for (std::size_t g = 0; g < sz(groups); ++g) {
        fa::AttentionWeights w;
        w.input_norm = foe::VectorView<const float>(m.norm[g].data(), {c.d});
        w.q_proj = foe::WeightMatrix(m.q[g].data(), {m.qw(), c.d});
        w.k_proj = foe::WeightMatrix(m.k[g].data(), {m.kw(), c.d});
        w.v_proj = foe::WeightMatrix(m.v[g].data(), {m.kw(), c.d});
        w.o_proj = foe::WeightMatrix(m.o[g].data(), {c.d, m.qw()});
        w.q_norm = foe::VectorView<const float>(m.qn[g].data(), {qn});
        w.k_norm = foe::VectorView<const float>(m.kn[g].data(), {kn});
        m.views.push_back(w);
    }
    return m;
}

std::vector<bfloat16> to_bf16(const std::vector<float>& v)
{
    std::vector<bfloat16> b(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) b[i] = bfloat16(v[i]);
    return b;
}

/// One group run by the per-group kernels, as cuda::Layer ran its attention: its weights, caches
/// and scratch of its own.
struct GroupReference {
    fc::DeviceBuffer<bfloat16> norm, qn, kn, qkv_w, o_w, kcache, vcache, normed, qkv, attn;
    fc::DeviceBuffer<unsigned char> ws;

    GroupReference(const GqaModel& m, std::size_t g, index_t per_cache)
    {
        std::vector<float> stacked = m.q[g];
        stacked.insert(stacked.end(), m.k[g].begin(), m.k[g].end());
        stacked.insert(stacked.end(), m.v[g].begin(), m.v[g].end());
        norm = fc::upload(to_bf16(m.norm[g]));
        if (!m.qn[g].empty()) {
            qn = fc::upload(to_bf16(m.qn[g]));
            kn = fc::upload(to_bf16(m.kn[g]));
        }
        qkv_w = fc::upload(to_bf16(stacked));
        o_w = fc::upload(to_bf16(m.o[g]));
        kcache = fc::DeviceBuffer<bfloat16>(sz(per_cache));
        vcache = fc::DeviceBuffer<bfloat16>(sz(per_cache));
        fc::fill_bytes(kcache, 0xff);
        fc::fill_bytes(vcache, 0xff);
        const index_t t = m.spec.max_tokens;
        normed = fc::DeviceBuffer<bfloat16>(sz(t * m.spec.hidden_size));
        qkv = fc::DeviceBuffer<bfloat16>(sz(t * m.row()));
        attn = fc::DeviceBuffer<bfloat16>(sz(t * m.qw()));
        const fc::AttentionShape shape{m.spec.q_heads, m.spec.kv_heads, m.spec.head_dim, m.spec.cache_capacity};
        ws = fc::DeviceBuffer<unsigned char>(fc::attention_workspace_bytes(shape, m.spec.max_sequences));
    }

    /// out += o(Attn(RMSNorm(x))) for this group, kernel by kernel.
    template <class Layout>
    void forward(const GqaModel& m, fc::TcGemm& gemm, const fc::DeviceBatch& batch, const Layout& layout,
                 const bfloat16* x, bfloat16* out)
    {
        const auto& s = m.spec;
        const index_t t = batch.tokens, d = s.hidden_size, hd = s.head_dim, row = m.row();
        fc::rms_norm(x, norm.data(), normed.data(), t, d, s.rms_norm_eps, nullptr);
        gemm.nt(normed.data(), qkv_w.data(), qkv.data(), fc::OutType::bf16, t, row, d, nullptr, 0.0f);
        bfloat16* q = qkv.data();
        bfloat16* k = q + m.qw();
        const bfloat16* v = k + m.kw();
        if (s.qk_norm == foe::QkNorm::per_head) {
            fc::rms_norm_qk(q, qn.data(), t, s.q_heads, hd, row, s.rms_norm_eps, nullptr);
            fc::rms_norm_qk(k, kn.data(), t, s.kv_heads, hd, row, s.rms_norm_eps, nullptr);
        } else if (s.qk_norm == foe::QkNorm::full_width) {
            fc::rms_norm_strided(q, qn.data(), q, t, 1, m.qw(), row, s.rms_norm_eps, nullptr);
            fc::rms_norm_strided(k, kn.data(), k, t, 1, m.kw(), row, s.rms_norm_eps, nullptr);
        }
        fc::rope(q, batch.positions, t, s.q_heads, hd, row, s.rope_theta, nullptr);
        fc::rope(k, batch.positions, t, s.kv_heads, hd, row, s.rope_theta, nullptr);
        fc::append_kv(batch, k, v, row, s.kv_heads, hd, layout, kcache.data(), vcache.data(), nullptr);
        const fc::AttentionShape shape{s.q_heads, s.kv_heads, hd, s.cache_capacity};
        fc::attention(shape, layout, batch, q, row, kcache.data(), vcache.data(), ws.data(), attn.data(), nullptr);
        gemm.nt(attn.data(), o_w.data(), out, fc::OutType::bf16, t, d, m.qw(), nullptr, 1.0f);
    }
};

/// The steps every case runs: a ragged prefill, a decode step, a chunked prefill beside a decode.
std::vector<std::vector<foe::SequenceChunk>> gqa_steps()
{
    return {{{2, 0, 37}, {0, 0, 5}, {1, 0, 70}}, {{2, 37, 1}, {0, 5, 1}, {1, 70, 1}}, {{0, 6, 9}, {2, 38, 1}}};
}

template <class Cache>
void run_grouped_case(const GqaCase& c, index_t groups, index_t streams, std::mt19937_64& rng)
{
    constexpr bool paged = std::is_same_v<Cache, fa::PagedKvCache>;
    const GqaModel m = make_gqa_model(c, groups, rng);
    const auto& spec = m.spec;
    const index_t d = spec.hidden_size, slots = spec.cache_slots, page = spec.page_size;
    const index_t width = (spec.cache_capacity + page - 1) / page, pool = slots * width;
    const index_t per_cache = paged ? pool * spec.kv_heads * page * spec.head_dim
                                    : slots * spec.kv_heads * spec.cache_capacity * spec.head_dim;
    const std::span<const fa::AttentionWeights> views(m.views);

    fa::CudaGqaAttention<fc::TcGemm, Cache> tc(spec, views);
    fa::CudaGqaAttention<fc::LtGemm, Cache> lt(spec, views);
    REQUIRE(tc.groups() == groups);
    REQUIRE(tc.group_cache_elements() == per_cache);
    CHECK(tc.shared_input_norm() == c.shared_norm);
    CHECK(tc.cache_bytes() >= sz(2 * groups * per_cache) * sizeof(bfloat16));
    for (auto* p : {tc.kcache(), tc.vcache(), lt.kcache(), lt.vcache()})
        fc::check(cudaMemset(const_cast<bfloat16*>(p), 0xff, sz(groups * per_cache) * sizeof(bfloat16)), "poison");
    std::vector<GroupReference> ref;
    for (std::size_t g = 0; g < sz(groups); ++g) ref.emplace_back(m, g, per_cache);
    std::vector<fa::GqaAttention<foe::gemm::Default, Cache>> host;
    for (const auto& w : m.views) host.emplace_back(spec, w);

    // A block table shared by the groups: pages handed out in a shuffled order.
    std::vector<std::int32_t> table(sz(slots * width));
    for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<std::int32_t>(i);
    std::shuffle(table.begin(), table.end(), rng);
    const auto device_table = fc::upload(table);
    const foe::BlockTableView host_table{page, slots, width, table.data()};
    const auto layout = [&] {
        if constexpr (paged)
            return fc::PagedKvLayout{static_cast<std::int32_t>(page), static_cast<std::int32_t>(width),
                                     device_table.data(), pool};
        else
            return fc::ContiguousKvLayout{static_cast<std::int32_t>(spec.cache_capacity)};
    }();

    fc::DeviceBuffer<unsigned char> scratch_memory(tc.scratch_bytes());
    fc::Scratch scratch(scratch_memory.data(), scratch_memory.size());
    const fc::DeviceContext ctx{nullptr, &scratch};
    fc::TcGemm gemm;
    for (const auto& chunks : gqa_steps()) {
        foe::Batch batch(chunks);
        if (paged) batch.with_block_tables(host_table);
        const index_t t = batch.tokens();
        CAPTURE(t);
        DeviceBatchData dev_batch = upload_batch(batch);
        if (paged) dev_batch.view.block_table = device_table.data();
        const auto x = random_bf16(sz(streams * t * d), rng);
        const auto x_dev = fc::upload(x.bits);
        // out starts as x (the residual the layer copies in); stream g reads x[g] or x[0].
        std::vector<bfloat16> start(sz(groups * t * d));
        for (index_t g = 0; g < groups; ++g)
            std::copy_n(x.bits.begin() + static_cast<std::ptrdiff_t>((streams == 1 ? 0 : g) * t * d), t * d,
                        start.begin() + static_cast<std::ptrdiff_t>(g * t * d));
        auto out_tc = fc::upload(start), out_lt = fc::upload(start), out_ref = fc::upload(start);
        const foe::TensorView<const bfloat16, 3> xv(x_dev.data(), {streams, t, d});
        scratch.reset();
        tc.forward(dev_batch.view, xv, foe::TensorView<bfloat16, 3>(out_tc.data(), {groups, t, d}), ctx);
        CHECK(scratch.used() <= tc.scratch_bytes());
        scratch.reset();
        lt.forward(dev_batch.view, xv, foe::TensorView<bfloat16, 3>(out_lt.data(), {groups, t, d}), ctx);
        for (index_t g = 0; g < groups; ++g)
            ref[sz(g)].forward(m, gemm, dev_batch.view, layout, x_dev.data() + (streams == 1 ? 0 : g) * t * d,
                               out_ref.data() + g * t * d);
        fc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");

        // Bit for bit against the group-by-group kernels: output and every group's caches.
        const auto got_tc = fc::download(out_tc);
        CHECK(same_bits(got_tc, fc::download(out_ref)));
        std::vector<bfloat16> kc(sz(groups * per_cache)), vc(kc.size());
        fc::check(cudaMemcpy(kc.data(), tc.kcache(), kc.size() * sizeof(bfloat16), cudaMemcpyDeviceToHost), "keys");
        fc::check(cudaMemcpy(vc.data(), tc.vcache(), vc.size() * sizeof(bfloat16), cudaMemcpyDeviceToHost), "values");
        for (index_t g = 0; g < groups; ++g) {
            CAPTURE(g);
            const auto from = kc.begin() + static_cast<std::ptrdiff_t>(g * per_cache);
            CHECK(same_bits(std::vector<bfloat16>(from, from + per_cache), fc::download(ref[sz(g)].kcache)));
            const auto vfrom = vc.begin() + static_cast<std::ptrdiff_t>(g * per_cache);
            CHECK(same_bits(std::vector<bfloat16>(vfrom, vfrom + per_cache), fc::download(ref[sz(g)].vcache)));
        }

        // Within bf16 tolerance of the host GqaAttention (fp32) of each group: out = x + Attn(x).
        std::vector<double> want(sz(groups * t * d));
        for (index_t g = 0; g < groups; ++g) {
            const float* xg = x.values.data() + (streams == 1 ? 0 : g) * t * d;
            std::vector<float> host_out(sz(t * d));
            host[sz(g)].forward(batch, foe::MatrixView<const float>(xg, {t, d}),
                                foe::MatrixView<float>(host_out.data(), {t, d}));
            for (index_t i = 0; i < t * d; ++i)
                want[sz(g * t * d + i)] = static_cast<double>(xg[i]) + static_cast<double>(host_out[sz(i)]);
        }
        const double err_tc = rel_error(to_float(got_tc), want), err_lt = rel_error(to_float(fc::download(out_lt)), want);
        CAPTURE(err_tc);
        CAPTURE(err_lt);
        CHECK(err_tc < 2e-2);
        CHECK(err_lt < 2e-2);
    }
}

}  // namespace

TEST_CASE("cuda: CudaGqaAttention over G groups equals the per-group kernels bit for bit and the host attention")
{
    if (!have_device()) return;
    std::mt19937_64 rng(28);
    // hd 32: tensor-core prefill, per-head QK-norm, GQA 2; hd 16: the simple kernel, no QK-norm;
    // a full-width QK-norm with input norms that differ per group (one stream: the batched GEMM).
    const GqaCase cases[] = {{64, 2, 1, 32, foe::QkNorm::per_head, true},
                             {32, 1, 1, 16, foe::QkNorm::none, true},
                             {64, 2, 2, 32, foe::QkNorm::full_width, false}};
    for (const auto& c : cases)
        for (const index_t groups : {1, 2, 4})
            for (const index_t streams : {index_t{1}, groups}) {
                CAPTURE(c.hd);
                CAPTURE(groups);
                CAPTURE(streams);
                run_grouped_case<fa::ContiguousKvCache>(c, groups, streams, rng);
                run_grouped_case<fa::PagedKvCache>(c, groups, streams, rng);
            }
}

// The spec and weight-shape checks throw before anything is allocated or uploaded: no device needed.
TEST_CASE("CudaGqaAttention rejects shapes the kernels cannot run, naming the tensor")
{
    std::mt19937_64 rng(29);
    GqaModel m = make_gqa_model({64, 2, 1, 32, foe::QkNorm::per_head, true}, 2, rng);
    const std::span<const fa::AttentionWeights> views(m.views);
    auto bad = m.spec;
    bad.head_dim = 12;  // not a multiple of 8
    CHECK_THROWS_AS(fa::CudaGqaAttention<fc::TcGemm>(bad, views), foe::ConfigError);
    bad = m.spec;
    bad.max_tokens = 0;
    CHECK_THROWS_AS(fa::CudaGqaAttention<fc::TcGemm>(bad, views), foe::ConfigError);
    bad = m.spec;
    bad.q_heads = 3;
    bad.kv_heads = 2;
    CHECK_THROWS_AS(fa::CudaGqaAttention<fc::TcGemm>(bad, views), foe::ConfigError);
    // A weight of the wrong shape: InvalidArgument naming it and the shape expected.
    std::vector<fa::AttentionWeights> wrong(m.views);
    wrong[1].o_proj = foe::WeightMatrix(m.o[1].data(), {m.spec.hidden_size / 2, m.qw()});
    CHECK_THROWS_WITH_AS(fa::CudaGqaAttention<fc::TcGemm>(m.spec, std::span<const fa::AttentionWeights>(wrong)),
                         doctest::Contains("group 1 attention weight o_proj has shape [32, 64], expected [64, 64]"),
                         foe::InvalidArgument);
}

// The batched GEMM entry point the grouped attention runs (q|k|v and o_proj of every group).
TEST_CASE("cuda: nt_batched equals nt per matrix (TcGemm bit for bit, LtGemm within tolerance)")
{
    if (!have_device()) return;
    std::mt19937_64 rng(30);
    struct Shape {
        index_t batch, m, n, k;
    };
    for (const auto sh : {Shape{1, 5, 24, 16}, Shape{3, 37, 96, 64}, Shape{4, 1, 64, 128}, Shape{2, 130, 200, 40}})
        for (const auto out : {fc::OutType::bf16, fc::OutType::fp32})
            for (const float beta : {0.0f, 1.0f}) {
                CAPTURE(sh.batch);
                CAPTURE(sh.m);
                CAPTURE(sh.n);
                CAPTURE(sh.k);
                CAPTURE(beta);
                const bool bf = out == fc::OutType::bf16;
                const index_t sa = sh.m * sh.k, sb = sh.n * sh.k, sc = sh.m * sh.n;
                const auto a = random_bf16(sz(sh.batch * sa), rng), b = random_bf16(sz(sh.batch * sb), rng);
                const auto c0 = random_bf16(sz(sh.batch * sc), rng);
                const auto da = fc::upload(a.bits), db = fc::upload(b.bits);
                // C as bf16 or fp32 bytes, starting from the same values.
                const std::size_t elem = bf ? sizeof(bfloat16) : sizeof(float);
                std::vector<unsigned char> start(sz(sh.batch * sc) * elem);
                for (std::size_t i = 0; i < sz(sh.batch * sc); ++i) {
                    if (bf)
                        std::memcpy(start.data() + i * elem, &c0.bits[i], elem);
                    else
                        std::memcpy(start.data() + i * elem, &c0.values[i], elem);
                }
                const auto run = [&](auto&& gemm, bool batched) {
                    auto c = fc::upload(start);
                    if (batched) {
                        gemm.nt_batched(da.data(), sa, db.data(), sb, c.data(), sc, sh.batch, out, sh.m, sh.n, sh.k,
                                        nullptr, beta);
                    } else {
                        for (index_t i = 0; i < sh.batch; ++i)
                            gemm.nt(da.data() + i * sa, db.data() + i * sb, c.data() + sz(i * sc) * elem, out, sh.m,
                                    sh.n, sh.k, nullptr, beta);
                    }
                    std::vector<double> values(sz(sh.batch * sc));
                    const auto bytes = fc::download(c);
                    for (std::size_t i = 0; i < values.size(); ++i) {
                        if (bf) {
                            bfloat16 v;
                            std::memcpy(&v, bytes.data() + i * elem, elem);
                            values[i] = static_cast<double>(static_cast<float>(v));
                        } else {
                            float v = 0.0f;
                            std::memcpy(&v, bytes.data() + i * elem, elem);
                            values[i] = v;
                        }
                    }
                    return std::pair{bytes, values};
                };
                // Float64 oracle.
                std::vector<double> want(sz(sh.batch * sc));
                for (index_t i = 0; i < sh.batch; ++i)
                    for (index_t r = 0; r < sh.m; ++r)
                        for (index_t col = 0; col < sh.n; ++col) {
                            double acc = beta * static_cast<double>(c0.values[sz(i * sc + r * sh.n + col)]);
                            for (index_t kk = 0; kk < sh.k; ++kk)
                                acc += static_cast<double>(a.values[sz(i * sa + r * sh.k + kk)]) *
                                       static_cast<double>(b.values[sz(i * sb + col * sh.k + kk)]);
                            want[sz(i * sc + r * sh.n + col)] = acc;
                        }
                fc::TcGemm tc;
                const auto tc_batched = run(tc, true), tc_loop = run(tc, false);
                CHECK(same_bits(tc_batched.first, tc_loop.first));
                CHECK(rel_error(tc_batched.second, want) < bf16_tolerance);
                fc::LtGemm lt;
                const auto lt_batched = run(lt, true);
                CHECK(rel_error(lt_batched.second, want) < bf16_tolerance);
            }
}

// Stride checks come before anything touches the device.
TEST_CASE("TcGemm::nt_batched rejects strides that would misalign a matrix")
{
    const fc::TcGemm tc;
    CHECK_THROWS_AS(tc.nt_batched(nullptr, 4, nullptr, 8, nullptr, 8, 2, fc::OutType::bf16, 1, 8, 8, nullptr),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(tc.nt_batched(nullptr, 8, nullptr, 8, nullptr, 2, 2, fc::OutType::fp32, 1, 8, 8, nullptr),
                    foe::InvalidArgument);
    CHECK_THROWS_AS(tc.nt_batched(nullptr, -8, nullptr, 8, nullptr, 8, 2, fc::OutType::bf16, 1, 8, 8, nullptr),
                    foe::InvalidArgument);
    CHECK_NOTHROW(tc.nt_batched(nullptr, 8, nullptr, 8, nullptr, 8, 0, fc::OutType::bf16, 1, 8, 8, nullptr));
}
