#pragma once
// CudaSwiGluExperts<Gemm>: the device experts policy, beside the host SwiGluExperts
// (experts/swiglu_experts.hpp) that is its oracle. FFN_e(u) = down_e( silu(gate_e u) * (up_e u) ),
// bf16 storage, fp32 accumulation.
//
//   compute: permute (CUB stable radix sort of the (token, slot) rows by held expert), gather the
//            rows of u, grouped SwiGLU (experts/grouped_swiglu.cuh: the expert offsets are read on
//            the device, a fixed number of launches whatever the routing, capturable in a CUDA
//            graph); y holds the outputs in sorted (by expert) row order
//   combine: one launch for every held group (experts/combine.cuh): out[h][i] = residual[i] + the
//            weighted outputs of token i's slots in group h, added in slot order in fp32, one
//            bf16 rounding
//
// compute() keeps the inverse permutation (row (i, s) -> its row of y) in the policy's own device
// array, so combine() must follow the compute() of the same routing. Slots routed to experts
// this policy does not hold get no row of y and add nothing in combine() (an expert-parallel
// rank's share, or a partial holder).
//
// Gemm: the layer's dense GEMM policy. The grouped kernel does not take it: it runs foe's own
// tensor-core tile loop (TcGemm's) for every Gemm, because a per-expert cuBLASLt GEMM needs the
// expert row counts on the host (a device-to-host synchronisation per layer, not capturable;
// experts/swiglu_reference.cuh keeps that version as the reference). The parameter is kept so that
// a composed layer's type names one GEMM choice for every policy; nothing here instantiates it.
//
// Bits: the same permutation plan, gather, grouped SwiGLU (same row count, so the same tile
// choice) and combine as foe::cuda::Layer's local-experts path.

#include <cstdint>
#include <utility>
#include <vector>

#include "foe/core/backend.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/tensor.hpp"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/gemm.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/upload.cuh"
#include "foe/experts/combine.cuh"
#include "foe/experts/experts.hpp"
#include "foe/experts/grouped_swiglu.cuh"
#include "foe/experts/permute.cuh"
#include "foe/routing/routing.hpp"

namespace foe::experts {

template <cuda::DeviceGemmPolicy Gemm = cuda::LtGemm>
class CudaSwiGluExperts {
public:
    using backend = CudaBackend;
    using gemm_type = Gemm;

    /// Uploads the experts [spec.expert_begin, spec.expert_end) (weights in id order, any stored
    /// dtype, rounded to bf16) as cuda::GroupedExpertWeights lays them out, and plans the
    /// permutation for spec.max_rows rows. Throws ConfigError for a spec the kernels cannot run
    /// (no experts or more than 1024, d or f not a multiple of 8) and InvalidArgument for
    /// max_rows < 1 or weights whose count or shapes disagree with the spec.
    CudaSwiGluExperts(const ExpertsSpec& spec, std::vector<ExpertWeights> weights);

    /// Bytes of DeviceContext scratch one compute() takes at most (combine() takes none): the
    /// permutation workspace, the sorted rows and expert offsets, the gathered inputs
    /// [max_rows, d] and the grouped SwiGLU workspace.
    [[nodiscard]] std::size_t scratch_bytes() const;

    /// u: [T, d] bf16 device; y: [T * slots, d] bf16 device (T * slots <= spec().max_rows),
    /// both contiguous. y receives the held experts' outputs in this policy's row order (sorted
    /// by expert); its rows past the held ones are not written. Enqueued on ctx.stream, no host
    /// synchronisation, no allocation.
    void compute(MatrixView<const bfloat16> u, const routing::DeviceRoutingResult& r, MatrixView<bfloat16> y,
                 const cuda::DeviceContext& ctx);

    /// out [held groups, T, d] (held groups = slots_per_token / slots_per_group) = residual [T, d]
    /// + for each held group h and token i the sum over h's slots s, in slot order, of
    /// w[i, s] * y[row of (i, s)]; every held stream in one launch. y is the last compute()'s
    /// output for the same routing. out must not overlap y or residual.
    void combine(const routing::DeviceRoutingResult& r, MatrixView<const bfloat16> y,
                 MatrixView<const bfloat16> residual, TensorView<bfloat16, 3> out, const cuda::DeviceContext& ctx) const;

    [[nodiscard]] const ExpertsSpec& spec() const noexcept { return spec_; }
    [[nodiscard]] index_t held_experts() const noexcept { return spec_.expert_end - spec_.expert_begin; }
    /// Device bytes of the held experts' weights (bf16 gate|up and down).
    [[nodiscard]] std::size_t weight_bytes() const noexcept
    {
        return static_cast<std::size_t>(held_experts() * 3 * spec_.hidden_size * spec_.intermediate_size) *
               sizeof(bfloat16);
    }
    /// Device bytes the policy holds: its weights and its [max_rows] inverse permutation (int32).
    [[nodiscard]] std::size_t device_bytes() const noexcept { return store_.bytes(); }
    /// The held weights as the grouped kernel and the expert exchanges take them.
    [[nodiscard]] cuda::GroupedExpertWeights grouped() const noexcept
    {
        return {gate_up_, down_, held_experts(), spec_.hidden_size, spec_.intermediate_size};
    }

private:
    static const ExpertsSpec& validated(const ExpertsSpec& spec, const std::vector<ExpertWeights>& w);

    ExpertsSpec spec_;
    cuda::PermutePlan plan_;
    cuda::DeviceArena store_;
    const bfloat16* gate_up_ = nullptr;  // [held, 2f, d]: per expert its f gate rows, then its f up rows
    const bfloat16* down_ = nullptr;     // [held, d, f]
    std::int32_t* inverse_ = nullptr;    // [max_rows]: row (i, s) -> its row of y, -1 when not held
};

static_assert(DeviceExpertsPolicy<CudaSwiGluExperts<>>);

// ---------------------------------------------------------------------------------------------


template <cuda::DeviceGemmPolicy Gemm>
const ExpertsSpec& CudaSwiGluExperts<Gemm>::validated(const ExpertsSpec& spec, const std::vector<ExpertWeights>& w)
{
    const index_t d = spec.hidden_size, f = spec.intermediate_size, held = spec.expert_end - spec.expert_begin;
    require<ConfigError>(spec.expert_begin >= 0 && spec.expert_begin <= spec.expert_end, "expert range [",
                         spec.expert_begin, ", ", spec.expert_end, ") is invalid");
    require<ConfigError>(held >= 1 && held <= cuda::grouped_swiglu_max_experts, "the CUDA experts hold 1 to ",
                         cuda::grouped_swiglu_max_experts, " experts; the range [", spec.expert_begin, ", ",
                         spec.expert_end, ") has ", held);
    require<ConfigError>(d > 0 && f > 0 && d % 8 == 0 && f % 8 == 0, "the CUDA experts need hidden_size (", d,
                         ") and intermediate_size (", f, ") to be positive multiples of 8 (16-byte bf16 rows)");
    require<InvalidArgument>(spec.max_rows > 0 && spec.max_rows <= 0x7fffffff, "CudaSwiGluExperts: max_rows (",
                             spec.max_rows, ") must be in [1, 2^31 - 1]: the device experts plan their buffers for it");
    detail::check_expert_weights(spec, w);
    return spec;
}

template <cuda::DeviceGemmPolicy Gemm>
CudaSwiGluExperts<Gemm>::CudaSwiGluExperts(const ExpertsSpec& spec, std::vector<ExpertWeights> weights)
    : spec_(validated(spec, weights)), plan_(spec.max_rows, spec.expert_end - spec.expert_begin)
{
    std::vector<bfloat16> gate_up, down;
    const auto per_matrix = static_cast<std::size_t>(spec.hidden_size * spec.intermediate_size);
    gate_up.reserve(weights.size() * 2 * per_matrix);
    down.reserve(weights.size() * per_matrix);
    for (const auto& e : weights) {
        cuda::append_bf16(gate_up, e.gate_proj);
        cuda::append_bf16(gate_up, e.up_proj);
        cuda::append_bf16(down, e.down_proj);
    }
    cuda::ArenaPlan plan;
    plan.add<bfloat16>(gate_up.size());
    plan.add<bfloat16>(down.size());
    plan.add<std::int32_t>(static_cast<std::size_t>(spec.max_rows));
    store_ = cuda::DeviceArena(plan.bytes());
    auto* gu = store_.take<bfloat16>(gate_up.size());
    auto* dn = store_.take<bfloat16>(down.size());
    cuda::check(cudaMemcpy(gu, gate_up.data(), gate_up.size() * sizeof(bfloat16), cudaMemcpyHostToDevice),
                "cudaMemcpy (expert gate|up)");
    cuda::check(cudaMemcpy(dn, down.data(), down.size() * sizeof(bfloat16), cudaMemcpyHostToDevice),
                "cudaMemcpy (expert down)");
    gate_up_ = gu;
    down_ = dn;
    inverse_ = store_.take<std::int32_t>(static_cast<std::size_t>(spec.max_rows));
}

template <cuda::DeviceGemmPolicy Gemm>
std::size_t CudaSwiGluExperts<Gemm>::scratch_bytes() const
{
    const auto rows = static_cast<std::size_t>(spec_.max_rows);
    return cuda::align_up(plan_.workspace_bytes()) + cuda::align_up(rows * sizeof(std::int32_t)) +
           cuda::align_up(static_cast<std::size_t>(held_experts() + 1) * sizeof(std::int32_t)) +
           cuda::align_up(rows * static_cast<std::size_t>(spec_.hidden_size) * sizeof(bfloat16)) +
           cuda::align_up(cuda::grouped_swiglu_workspace_bytes(spec_.max_rows, held_experts(), spec_.intermediate_size));
}

template <cuda::DeviceGemmPolicy Gemm>
void CudaSwiGluExperts<Gemm>::compute(MatrixView<const bfloat16> u, const routing::DeviceRoutingResult& r,
                                      MatrixView<bfloat16> y, const cuda::DeviceContext& ctx)
{
    const index_t d = spec_.hidden_size, t = r.tokens, slots = r.slots_per_token, rows = t * slots;
    require(u.extent(0) == t && u.extent(1) == d, "experts input is ", format_shape(u.shape()), ", expected [", t,
            ", ", d, "]");
    require(y.extent(0) == rows && y.extent(1) == d, "experts output is ", format_shape(y.shape()), ", expected [",
            rows, ", ", d, "]");
    require(rows <= spec_.max_rows, "experts: ", t, " tokens x ", slots, " slots = ", rows,
            " rows exceed the planned max_rows ", spec_.max_rows);
    if (rows == 0) return;
    require(slots > 0 && u.is_contiguous() && y.is_contiguous() && r.experts != nullptr,
            "experts: u and y must be contiguous device matrices and the routing must hold its experts");
    const auto n = static_cast<std::size_t>(rows);
    void* permute_ws = ctx.take<unsigned char>(plan_.workspace_bytes());
    std::int32_t* sorted = ctx.take<std::int32_t>(n);
    std::int32_t* offsets = ctx.take<std::int32_t>(static_cast<std::size_t>(held_experts() + 1));
    bfloat16* gathered = ctx.take<bfloat16>(n * static_cast<std::size_t>(d));
    void* swiglu_ws =
        ctx.take<unsigned char>(cuda::grouped_swiglu_workspace_bytes(rows, held_experts(), spec_.intermediate_size));
    cuda::permute(plan_, rows, r.experts, spec_.expert_begin, permute_ws, cuda::PermuteOutputs{sorted, offsets, inverse_},
                  ctx.stream);
    cuda::gather_rows(u.data(), sorted, rows, slots, d, gathered, ctx.stream);
    cuda::grouped_swiglu(grouped(), offsets, gathered, rows, swiglu_ws, y.data(), ctx.stream);
}

template <cuda::DeviceGemmPolicy Gemm>
void CudaSwiGluExperts<Gemm>::combine(const routing::DeviceRoutingResult& r, MatrixView<const bfloat16> y,
                                      MatrixView<const bfloat16> residual, TensorView<bfloat16, 3> out,
                                      const cuda::DeviceContext& ctx) const
{
    const index_t d = spec_.hidden_size, t = r.tokens, slots = r.slots_per_token, per_group = r.slots_per_group;
    require(per_group > 0 && slots % per_group == 0 && out.extent(0) == slots / per_group,
            "experts combine: ", slots, " slots per token in groups of ", per_group, " make ",
            per_group > 0 ? slots / per_group : 0, " streams; the output has ", out.extent(0));
    require(out.extent(1) == t && out.extent(2) == d && residual.extent(0) == t && residual.extent(1) == d &&
                y.extent(0) == t * slots && y.extent(1) == d,
            "experts combine: shapes disagree with the routing of ", t, " tokens of width ", d, ": y is ",
            format_shape(y.shape()), ", residual ", format_shape(residual.shape()), ", out ", format_shape(out.shape()));
    require(t * slots <= spec_.max_rows, "experts combine: ", t * slots, " rows exceed the planned max_rows ",
            spec_.max_rows);
    if (t == 0) return;
    require(out.is_contiguous() && residual.is_contiguous() && y.is_contiguous(),
            "experts combine: y, residual and out must be contiguous");
    cuda::combine(y.data(), inverse_, r.weights, residual.data(), t, d, slots, per_group, out.data(), ctx.stream);
}

}  // namespace foe::experts
