// Host kernels, one at a time, on the foe-1b shapes (d 768, head_dim 96, E 64, k 8, f 384):
// dense projection GEMM (foe's batch-invariant kernel and the CBLAS policy, and the two paired on
// every GEMM shape of foe-1b and moe-1b as a ratio; decode steps at 7b-like widths and with a
// bf16 weight, with B's bandwidth beside the machine's copy bandwidth), the groups' q|k|v as one
// GEMM per group against one stacked GEMM (what group-batching would gain), the grouped SwiGLU experts
// next to OpenBLAS sgemm doing the same FLOPs as three large GEMMs, router + top-k, the
// permutation of rows by expert, the weighted combine, attention prefill and decode, RMSNorm.
//
//   build/bench/bench_kernels --benchmark_counters_tabular=true

#include "bench_util.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(FOE_WITH_CBLAS)
#include <cblas.h>
#endif

namespace {

using bench::index_t;
using foe::MatrixView;

constexpr index_t d = 768, f = 384, experts_count = 64, top_k = 8, head_dim = 96;

// --- dense projection: [T, d] x [d, d]^T -----------------------------------------------------------

template <class Gemm>
void gemm_nt(benchmark::State& state)
{
    const index_t m = state.range(0), n = state.range(1), k = state.range(2);
    const auto a = bench::random(static_cast<std::size_t>(m * k), 1), b = bench::random(static_cast<std::size_t>(n * k), 2);
    std::vector<float> c(static_cast<std::size_t>(m * n));
    for (auto _ : state) {
        Gemm::nt(MatrixView<const float>(a.data(), {m, k}), MatrixView<const float>(b.data(), {n, k}),
                 MatrixView<float>(c.data(), {m, n}), false);
        benchmark::DoNotOptimize(c.data());
    }
    bench::set_rates(state, 2.0 * static_cast<double>(m * n * k), 4.0 * static_cast<double>(m * k + n * k + m * n));
}
void projection_shapes(benchmark::internal::Benchmark* b)
{
    for (index_t t : {1, 128, 2048}) b->Args({t, d, d});
    b->ArgNames({"M", "N", "K"})->UseRealTime();
}
BENCHMARK(gemm_nt<foe::gemm::BatchInvariant>)->Name("gemm_nt/batch_invariant")->Apply(projection_shapes);
#if defined(FOE_WITH_CBLAS)
BENCHMARK(gemm_nt<foe::gemm::Cblas>)->Name("gemm_nt/cblas")->Apply(projection_shapes);

/// BatchInvariant and OpenBLAS sgemm on the same operands, alternating inside every iteration so
/// both see the same machine state; the benchmark's time is BatchInvariant's, and the counters
/// give both rates and "vs OpenBLAS" = OpenBLAS time / BatchInvariant time (above 1: foe faster).
/// "foe B GB/s" and "OpenBLAS B GB/s" are B's bytes over each one's time: for M = 1 (a decode
/// step, one pass over the weight) the bandwidth each reaches, to set beside copy_bandwidth.
/// With a bf16 B (BElem), foe reads the bf16 weight (2 bytes an element) and OpenBLAS the same
/// weight widened to fp32 (what a Cblas caller has to hand it); both give the same products.
/// With fp32 both read the same buffer, so a B that fits in L3 is warm for both.
template <class BElem>
void gemm_pair(benchmark::State& state)
{
    const index_t m = state.range(0), n = state.range(1), k = state.range(2);
    const auto a = bench::random(static_cast<std::size_t>(m * k), 1);
    auto b = bench::random(static_cast<std::size_t>(n * k), 2);
    std::vector<BElem> b_stored;
    if constexpr (!std::is_same_v<BElem, float>) {
        b_stored.resize(b.size());
        for (std::size_t i = 0; i < b.size(); ++i) {
            b_stored[i] = BElem(b[i]);
            b[i] = static_cast<float>(b_stored[i]);  // OpenBLAS gets the widened values
        }
    }
    std::vector<float> c(static_cast<std::size_t>(m * n));
    const MatrixView<const float> av(a.data(), {m, k}), bv(b.data(), {n, k});
    const MatrixView<const BElem> bs = [&] {
        if constexpr (std::is_same_v<BElem, float>)
            return bv;
        else
            return MatrixView<const BElem>(b_stored.data(), {n, k});
    }();
    const MatrixView<float> cv(c.data(), {m, n});
    double foe_seconds = 0.0, blas_seconds = 0.0;
    using clock = std::chrono::steady_clock;
    for (auto _ : state) {
        const auto t0 = clock::now();
        foe::gemm::BatchInvariant::nt(av, bs, cv, false);
        benchmark::DoNotOptimize(c.data());
        const auto t1 = clock::now();
        foe::gemm::Cblas::nt(av, bv, cv, false);
        benchmark::DoNotOptimize(c.data());
        const auto t2 = clock::now();
        const double foe_s = std::chrono::duration<double>(t1 - t0).count();
        foe_seconds += foe_s;
        blas_seconds += std::chrono::duration<double>(t2 - t1).count();
        state.SetIterationTime(foe_s);
    }
    const auto iterations = static_cast<double>(state.iterations());
    const double flops = 2.0 * static_cast<double>(m * n * k) * iterations;
    const double elements = static_cast<double>(n * k) * iterations;
    state.counters["foe GFLOP/s"] = flops / foe_seconds * 1e-9;
    state.counters["OpenBLAS GFLOP/s"] = flops / blas_seconds * 1e-9;
    state.counters["foe B GB/s"] = static_cast<double>(sizeof(BElem)) * elements / foe_seconds * 1e-9;
    state.counters["OpenBLAS B GB/s"] = 4.0 * elements / blas_seconds * 1e-9;
    state.counters["vs OpenBLAS"] = blas_seconds / foe_seconds;
}
/// Every GEMM shape of one foe-1b / moe-1b layer (d 768, 8 heads of 96, 64 experts of 384, top-8)
/// at 1 token (decode), 128 and 2048 tokens, and the LM head (vocab 50304) for one row.
void foe_1b_shapes(benchmark::internal::Benchmark* b)
{
    for (index_t t : {1, 128, 2048}) {
        const index_t expert_rows = std::max<index_t>(1, t * top_k / experts_count);
        b->Args({t, d, d});                       // MoE q/k/v/o projection
        b->Args({t, head_dim, d});                // FoE group's q, k or v slice
        b->Args({t, d, head_dim});                // FoE group's o_proj slice
        b->Args({t, experts_count, d});           // MoE router
        b->Args({expert_rows, f, d});             // expert gate / up
        b->Args({expert_rows, d, f});             // expert down
    }
    b->Args({1, 50304, d});                       // LM head, last position
    b->ArgNames({"M", "N", "K"})->UseManualTime();
}
/// Decode steps (M = 1) at 7b-like widths (d 2048, experts of 1024, the LM head of a 2048-wide
/// model), and a few rows more (M 2 to 8 at 2048 x 2048: the small-M path takes M <= 4).
void decode_shapes(benchmark::internal::Benchmark* b)
{
    b->Args({1, 2048, 2048});   // a 2048-wide projection
    b->Args({1, 1024, 2048});   // expert gate / up
    b->Args({1, 2048, 1024});   // expert down
    b->Args({1, 50304, 2048});  // LM head, 400 MiB of fp32: out of every cache
    for (index_t m : {2, 3, 4, 5, 6, 8}) b->Args({m, 2048, 2048});
    b->ArgNames({"M", "N", "K"})->UseManualTime();
}
/// The M = 1 shapes of both families with a bf16 weight.
void decode_bf16_shapes(benchmark::internal::Benchmark* b)
{
    for (const auto& [n, k] : {std::pair<index_t, index_t>{d, d}, {head_dim, d}, {d, head_dim}, {experts_count, d}, {f, d},
                               {d, f}, {50304, d}, {2048, 2048}, {1024, 2048}, {2048, 1024}, {50304, 2048}})
        b->Args({1, n, k});
    b->ArgNames({"M", "N", "K"})->UseManualTime();
}
BENCHMARK(gemm_pair<float>)->Name("gemm_pair/batch_invariant_vs_openblas")->Apply(foe_1b_shapes);
BENCHMARK(gemm_pair<float>)->Name("gemm_pair/decode")->Apply(decode_shapes);
BENCHMARK(gemm_pair<foe::bfloat16>)->Name("gemm_pair/decode_bf16_b")->Apply(decode_bf16_shapes);
#endif

// --- q|k|v of an FoE layer's groups: one GEMM per group, or one over the stacked groups ----------

/// The host runs one attention instance per group (layer_exec<HostBackend>): H GEMMs of
/// [T, d] x [n, d]^T for the groups' q|k|v (n = (q heads per group + 2) x head_dim). The CUDA
/// backend stacks them into one [T, d] x [H n, d]^T where the groups share their input (the first
/// layer; later layers' groups have H inputs, so no stacking applies). This pair, on foe-1b's
/// shapes with foe's GEMM, bounds what stacking could gain on the host: both run alternately in
/// every iteration; the benchmark's time is the per-group loop's, "stacked vs per-group" is the
/// per-group time over the stacked time (above 1: stacking is faster).
void group_qkv(benchmark::State& state)
{
    const foe::ModelConfig c = foe::named_config("foe-1b");
    const index_t t = state.range(0), h = c.groups(), k = c.hidden_size;
    const index_t n = (c.q_heads_per_group() + 2 * c.kv_heads_per_group()) * c.head_dim;
    const auto x = bench::random(static_cast<std::size_t>(t * k), 1), w = bench::random(static_cast<std::size_t>(h * n * k), 2);
    std::vector<float> per_group(static_cast<std::size_t>(h * t * n)), stacked(per_group.size());
    const MatrixView<const float> xv(x.data(), {t, k}), wv(w.data(), {h * n, k});
    double loop_seconds = 0.0, stacked_seconds = 0.0;
    using clock = std::chrono::steady_clock;
    for (auto _ : state) {
        const auto t0 = clock::now();
        for (index_t g = 0; g < h; ++g)
            foe::gemm::BatchInvariant::nt(xv, wv.slice(0, g * n, n), MatrixView<float>(per_group.data() + g * t * n, {t, n}),
                                          false);
        benchmark::DoNotOptimize(per_group.data());
        const auto t1 = clock::now();
        foe::gemm::BatchInvariant::nt(xv, wv, MatrixView<float>(stacked.data(), {t, h * n}), false);
        benchmark::DoNotOptimize(stacked.data());
        const auto t2 = clock::now();
        const double loop_s = std::chrono::duration<double>(t1 - t0).count();
        loop_seconds += loop_s;
        stacked_seconds += std::chrono::duration<double>(t2 - t1).count();
        state.SetIterationTime(loop_s);
    }
    const double flops = 2.0 * static_cast<double>(t * h * n * k) * static_cast<double>(state.iterations());
    state.counters["per-group GFLOP/s"] = flops / loop_seconds * 1e-9;
    state.counters["stacked GFLOP/s"] = flops / stacked_seconds * 1e-9;
    state.counters["stacked vs per-group"] = loop_seconds / stacked_seconds;
}
BENCHMARK(group_qkv)->Name("group_qkv/per_group_vs_stacked")->Arg(1)->Arg(8)->Arg(128)->Arg(2048)->ArgName("T")->UseManualTime();

/// The machine's copy bandwidth, to state a decode GEMM's B GB/s as a fraction of it: memcpy of
/// a 256 MiB buffer (far past the caches), split into one contiguous part per thread. "copy GB/s"
/// is bytes copied per second; "read+write GB/s" counts both the read and the write.
void copy_bandwidth(benchmark::State& state)
{
    const auto threads = static_cast<int>(state.range(0));
    const std::size_t bytes = std::size_t{256} << 20;
    std::vector<char> from(bytes, 1), to(bytes, 2);  // filled: every page is touched before timing
    const std::size_t part = bytes / static_cast<std::size_t>(threads);
    for (auto _ : state) {
        FOE_OMP_PARALLEL_FOR
        for (int t = 0; t < threads; ++t)
            std::memcpy(to.data() + static_cast<std::size_t>(t) * part, from.data() + static_cast<std::size_t>(t) * part, part);
        benchmark::DoNotOptimize(to.data());
        benchmark::ClobberMemory();
    }
    const auto copied = static_cast<double>(bytes) * static_cast<double>(state.iterations());
    state.counters["copy GB/s"] = benchmark::Counter(copied * 1e-9, benchmark::Counter::kIsRate);
    state.counters["read+write GB/s"] = benchmark::Counter(2.0 * copied * 1e-9, benchmark::Counter::kIsRate);
}
BENCHMARK(copy_bandwidth)->Name("copy_bandwidth")->Arg(1)->Arg(2)->ArgName("threads")->UseRealTime();

// --- grouped SwiGLU experts, against sgemm of the same FLOPs -----------------------------------------

/// Random top-k routing of T tokens over 64 experts (8 distinct per token).
foe::routing::RoutingResult random_routing(index_t tokens)
{
    foe::routing::RoutingResult r;
    r.tokens = tokens;
    r.slots_per_token = r.slots_per_group = top_k;
    r.experts.resize(static_cast<std::size_t>(tokens * top_k));
    r.weights.assign(r.experts.size(), 1.0f / static_cast<float>(top_k));
    const foe::CounterRng rng(3, 4);
    for (index_t i = 0; i < tokens; ++i)
        for (index_t s = 0; s < top_k; ++s)  // one expert in each block of 8: distinct
            r.experts[static_cast<std::size_t>(i * top_k + s)] =
                static_cast<std::int32_t>(s * 8 + static_cast<index_t>(rng.bits(static_cast<std::uint64_t>(i * top_k + s)) % 8));
    return r;
}

struct ExpertWeights {
    std::vector<float> storage = bench::random(static_cast<std::size_t>(experts_count * 3 * d * f), 5);
    std::vector<foe::experts::ExpertWeights> views() const
    {
        std::vector<foe::experts::ExpertWeights> v;
        for (index_t e = 0; e < experts_count; ++e) {
            const float* base = storage.data() + e * 3 * d * f;
            v.push_back({{base, {f, d}}, {base + d * f, {f, d}}, {base + 2 * d * f, {d, f}}});
        }
        return v;
    }
};

double expert_flops(index_t tokens) { return 2.0 * static_cast<double>(tokens * top_k) * 3.0 * d * f; }

template <class Gemm>
void experts_swiglu(benchmark::State& state)
{
    const index_t t = state.range(0);
    const ExpertWeights w;
    foe::experts::SwiGluExperts<Gemm> x({d, f, 0, experts_count}, w.views());
    const auto u = bench::random(static_cast<std::size_t>(t * d), 6);
    const auto routing = random_routing(t);
    std::vector<float> y(static_cast<std::size_t>(t * top_k * d));
    for (auto _ : state) {
        x.compute(MatrixView<const float>(u.data(), {t, d}), routing, MatrixView<float>(y.data(), {t * top_k, d}));
        benchmark::DoNotOptimize(y.data());
    }
    bench::set_rates(state, expert_flops(t), 4.0 * static_cast<double>(experts_count * 3 * d * f));
}
BENCHMARK(experts_swiglu<foe::gemm::BatchInvariant>)->Name("experts_swiglu/batch_invariant")->Arg(128)->Arg(2048)->ArgName("T")->UseRealTime();
#if defined(FOE_WITH_CBLAS)
BENCHMARK(experts_swiglu<foe::gemm::Cblas>)->Name("experts_swiglu/cblas")->Arg(128)->Arg(2048)->ArgName("T")->UseRealTime();

/// The same FLOPs as three dense sgemm calls over all T k rows: what the grouped kernel would
/// reach if grouping, gathering and per-expert calls cost nothing.
void openblas_sgemm_same_flops(benchmark::State& state)
{
    const index_t rows = state.range(0) * top_k;
    const auto x = bench::random(static_cast<std::size_t>(rows * d), 7), w1 = bench::random(static_cast<std::size_t>(f * d), 8),
               w2 = bench::random(static_cast<std::size_t>(d * f), 9);
    std::vector<float> h(static_cast<std::size_t>(rows * f)), g(h.size()), y(static_cast<std::size_t>(rows * d));
    const int m = static_cast<int>(rows), di = static_cast<int>(d), fi = static_cast<int>(f);
    for (auto _ : state) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, fi, di, 1.0f, x.data(), di, w1.data(), di, 0.0f, h.data(), fi);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, fi, di, 1.0f, x.data(), di, w1.data(), di, 0.0f, g.data(), fi);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, di, fi, 1.0f, g.data(), fi, w2.data(), fi, 0.0f, y.data(), di);
        benchmark::DoNotOptimize(y.data());
    }
    bench::set_rates(state, expert_flops(state.range(0)), 0);
}
BENCHMARK(openblas_sgemm_same_flops)->Name("experts_swiglu/openblas_sgemm_same_flops")->Arg(128)->Arg(2048)->ArgName("T")->UseRealTime();
#endif

// --- router + top-k, permute, combine ---------------------------------------------------------------

template <class Selection>
void router_topk(benchmark::State& state)
{
    const index_t t = state.range(0), groups = Selection::per_group ? 8 : 1;
    const auto gate = bench::random(static_cast<std::size_t>(experts_count * d), 10);
    foe::routing::Router<foe::routing::Softmax, Selection> router({experts_count, top_k, groups, 0, groups, true},
                                                                  MatrixView<const float>(gate.data(), {experts_count, d}), {});
    const auto u = bench::random(static_cast<std::size_t>(t * d), 11);
    foe::routing::RoutingResult out;
    for (auto _ : state) {
        router.route(MatrixView<const float>(u.data(), {t, d}), out);
        benchmark::DoNotOptimize(out.experts.data());
    }
    bench::set_rates(state, 2.0 * static_cast<double>(t * d * experts_count), 4.0 * static_cast<double>(t * d + experts_count * d));
}
BENCHMARK(router_topk<foe::routing::PerGroupTopK>)->Name("router_topk/foe_per_group")->Arg(2048)->ArgName("T")->UseRealTime();
BENCHMARK(router_topk<foe::routing::GlobalTopK>)->Name("router_topk/moe_global")->Arg(2048)->ArgName("T")->UseRealTime();

void permute(benchmark::State& state)
{
    const index_t t = state.range(0);
    const auto routing = random_routing(t);
    const auto u = bench::random(static_cast<std::size_t>(t * d), 12);
    std::vector<float> gathered(static_cast<std::size_t>(t * top_k * d));
    foe::experts::Permutation perm;
    for (auto _ : state) {
        foe::experts::group_rows(t * top_k, experts_count, [&](index_t p) { return routing.experts[static_cast<std::size_t>(p)]; }, perm);
        for (std::size_t i = 0; i < perm.rows.size(); ++i)
            std::copy_n(&u[static_cast<std::size_t>(perm.rows[i] / top_k * d)], d, &gathered[i * static_cast<std::size_t>(d)]);
        benchmark::DoNotOptimize(gathered.data());
    }
    bench::set_rates(state, 0, 2.0 * 4.0 * static_cast<double>(t * top_k * d));
}
BENCHMARK(permute)->Name("permute/by_expert_and_gather")->Arg(2048)->ArgName("T")->UseRealTime();

void combine(benchmark::State& state)
{
    const index_t t = state.range(0);
    const auto routing = random_routing(t);
    const auto y = bench::random(static_cast<std::size_t>(t * top_k * d), 13), residual = bench::random(static_cast<std::size_t>(t * d), 14);
    std::vector<float> out(residual.size());
    for (auto _ : state) {
        foe::experts::SwiGluExperts<>::combine(routing, MatrixView<const float>(y.data(), {t * top_k, d}),
                                               MatrixView<const float>(residual.data(), {t, d}), 0, top_k,
                                               MatrixView<float>(out.data(), {t, d}));
        benchmark::DoNotOptimize(out.data());
    }
    bench::set_rates(state, 2.0 * static_cast<double>(t * top_k * d), 4.0 * static_cast<double>(t * top_k * d + 2 * t * d));
}
BENCHMARK(combine)->Name("combine/weighted_sum")->Arg(2048)->ArgName("T")->UseRealTime();

// --- attention ------------------------------------------------------------------------------------

/// One attention instance with `heads` query and KV heads of 96 (an FoE group of foe-1b has 1).
struct AttentionFixture {
    index_t heads;
    std::vector<float> norm = std::vector<float>(static_cast<std::size_t>(d), 1.0f);
    std::vector<float> qkv, o, qk_norm = std::vector<float>(static_cast<std::size_t>(head_dim), 1.0f);
    explicit AttentionFixture(index_t h)
        : heads(h), qkv(bench::random(static_cast<std::size_t>(3 * h * head_dim * d), 15)),
          o(bench::random(static_cast<std::size_t>(d * h * head_dim), 16))
    {
    }
    foe::attention::GqaAttention<> make(index_t capacity) const
    {
        const index_t w = heads * head_dim;
        foe::attention::AttentionWeights a;
        a.input_norm = {norm.data(), {d}};
        a.q_proj = {qkv.data(), {w, d}};
        a.k_proj = {qkv.data() + w * d, {w, d}};
        a.v_proj = {qkv.data() + 2 * w * d, {w, d}};
        a.o_proj = {o.data(), {d, w}};
        a.q_norm = a.k_norm = {qk_norm.data(), {head_dim}};
        return {{d, heads, heads, head_dim, foe::QkNorm::per_head, 1e-5f, 500000.0, 1, capacity}, a};
    }
    double projection_flops(index_t t) const { return 2.0 * static_cast<double>(t * d * 4 * heads * head_dim); }
};

void attention_prefill(benchmark::State& state)
{
    const index_t heads = state.range(0), t = state.range(1);
    const AttentionFixture fx(heads);
    auto attention = fx.make(t);
    const auto x = bench::random(static_cast<std::size_t>(t * d), 17);
    std::vector<float> out(x.size());
    for (auto _ : state) {
        attention.forward(foe::Batch::single(0, t), {x.data(), {t, d}}, {out.data(), {t, d}});
        benchmark::DoNotOptimize(out.data());
    }
    const double scores = static_cast<double>(t) * static_cast<double>(t + 1) / 2.0;
    bench::set_rates(state, fx.projection_flops(t) + 4.0 * scores * static_cast<double>(heads * head_dim), 0);
}
BENCHMARK(attention_prefill)->Name("attention_prefill")->Args({1, 512})->Args({8, 512})->Args({1, 2048})->Args({8, 2048})->ArgNames({"heads", "T"})->UseRealTime();

void attention_decode(benchmark::State& state)
{
    const index_t heads = state.range(0), context = state.range(1);
    const AttentionFixture fx(heads);
    auto attention = fx.make(context + 1);
    const auto prompt = bench::random(static_cast<std::size_t>(context * d), 18), x = bench::random(static_cast<std::size_t>(d), 19);
    std::vector<float> out(prompt.size());
    attention.forward(foe::Batch::single(0, context), {prompt.data(), {context, d}}, {out.data(), {context, d}});
    for (auto _ : state) {  // the same position every time: a step at a fixed context length
        attention.forward(foe::Batch::single(context, 1), {x.data(), {1, d}}, {out.data(), {1, d}});
        benchmark::DoNotOptimize(out.data());
    }
    const double kv_bytes = 2.0 * 4.0 * static_cast<double>((context + 1) * heads * head_dim);
    bench::set_rates(state, fx.projection_flops(1) + 4.0 * static_cast<double>((context + 1) * heads * head_dim),
                     kv_bytes + 4.0 * static_cast<double>(4 * heads * head_dim * d));
}
BENCHMARK(attention_decode)->Name("attention_decode")->Args({1, 2048})->Args({8, 2048})->Args({8, 8192})->ArgNames({"heads", "context"})->UseRealTime();

// --- RMSNorm --------------------------------------------------------------------------------------

void rms_norm(benchmark::State& state)
{
    const index_t t = state.range(0);
    const auto x = bench::random(static_cast<std::size_t>(t * d), 20), w = bench::random(static_cast<std::size_t>(d), 21);
    std::vector<float> y(x.size());
    for (auto _ : state) {
        foe::ops::rms_norm({x.data(), {t, d}}, {w.data(), {d}}, 1e-5f, {y.data(), {t, d}});
        benchmark::DoNotOptimize(y.data());
    }
    bench::set_rates(state, 4.0 * static_cast<double>(t * d), 4.0 * static_cast<double>(2 * t * d + d));
}
BENCHMARK(rms_norm)->Name("rms_norm")->Arg(2048)->ArgName("T")->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
