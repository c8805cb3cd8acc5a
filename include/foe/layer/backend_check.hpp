#pragma once
// The compile-time check that the policies of one layer share a backend (core/backend.hpp): a
// layer instantiates layer_policies_share_backend, which names each policy's kind and type in
// the compiler's instantiation trace when one runs elsewhere than the layer's attention, e.g.
//
//   error: static assertion failed: a policy of this layer runs on another backend than the
//          layer's attention policy ...
//   note: in instantiation of 'struct foe::detail::policy_on_backend<foe::detail::PolicyKind::
//         residual_sync, foe::sync::AllReduceMean<foe::comm::NcclComm>, foe::HostBackend>'
//
// (a host layer whose residual sync is an all-reduce over NCCL would hand NCCL host pointers).

#include <concepts>

#include "foe/core/backend.hpp"

namespace foe::detail {

enum class PolicyKind { attention, routing, experts, expert_parallel, residual_sync, communicator };

template <PolicyKind Kind, class Policy, class LayerBackend>
struct policy_on_backend {
    static_assert(std::same_as<backend_of_t<Policy>, LayerBackend>,
                  "a policy of this layer runs on another backend than the layer's attention policy: the policies "
                  "of one layer share a backend (host or cuda); the compiler's instantiation notes name the "
                  "policy's kind, its type and the layer's backend");
    static constexpr bool value = true;
};

/// True when the routing, experts and expert-parallel policies run on Attention's backend;
/// otherwise a compile error naming the one that does not (MoeLayer's check).
template <class Attention, class Routing, class Experts, class ExpertParallel>
inline constexpr bool moe_policies_share_backend =
    policy_on_backend<PolicyKind::routing, Routing, backend_of_t<Attention>>::value &&
    policy_on_backend<PolicyKind::experts, Experts, backend_of_t<Attention>>::value &&
    policy_on_backend<PolicyKind::expert_parallel, ExpertParallel, backend_of_t<Attention>>::value;

/// The same with a residual-sync policy (FoeLayer's check).
template <class Attention, class Routing, class Experts, class ExpertParallel, class Sync>
inline constexpr bool foe_policies_share_backend =
    moe_policies_share_backend<Attention, Routing, Experts, ExpertParallel> &&
    policy_on_backend<PolicyKind::residual_sync, Sync, backend_of_t<Attention>>::value;

}  // namespace foe::detail
