#pragma once
// foe's CUDA parts (needs nvcc, the CUDA runtime and cuBLASLt); foe/foe.hpp is the host library.
// The NCCL communicator is separate (foe/comm/nccl_comm.cuh; it needs NCCL), and so is expert
// parallelism over it (foe/parallel/all_to_all_ep.cuh: DeviceAllToAllEP, naive and deduplicated
// dispatch, dynamic or fixed capacity).
//
//   kernels    in their kinds' folders, beside the host policies they mirror:
//              ops/ rmsnorm.cuh, rope.cuh, elementwise.cuh;
//              attention/ kv_append.cuh, kv_layout.cuh, prefill_attention.cuh,
//              decode_attention.cuh;
//              routing/router_kernel.cuh;
//              experts/ permute.cuh, grouped_swiglu.cuh (device offsets), swiglu_reference.cuh
//              (per-expert cuBLASLt reference), combine.cuh;
//              parallel/expert_exchange.cuh (the interface a layer reaches remote experts through)
//   backend    cuda/: stream.cuh, arena.cuh, check.cuh, error.cuh, config.cuh, batch.cuh,
//              upload.cuh, groups.cuh; layer_exec.cuh and moe_head_parallel_layer.cuh (how the
//              layers run on the device)
//   GEMMs      cuda/gemm.cuh (the DeviceGemmPolicy concept), cuda/gemm_lt.cuh (cuBLASLt),
//              cuda/gemm_tc.cuh (foe's own)
//   policies   the device policies a layer is composed from (FoeLayer / MoeLayer over them run
//              on a CUDA stream, cuda/layer_exec.cuh): attention/gqa_attention.cuh, routing/router.cuh,
//              experts/swiglu_experts.cuh, parallel/local_experts.cuh, parallel/exchange_experts.cuh,
//              sync/all_reduce_mean.cuh (over comm/cuda_self_comm.cuh or NcclComm), sync/no_sync.cuh;
//              cuda/context.cuh: the stream and scratch of their calls
//   model      cuda/model.cuh: cuda::CudaModel, the ModelInterface on a GPU, decode steps in CUDA graphs

#include "foe/attention/decode_attention.cuh"
#include "foe/attention/gqa_attention.cuh"
#include "foe/attention/kv_append.cuh"
#include "foe/attention/kv_layout.cuh"
#include "foe/attention/prefill_attention.cuh"
#include "foe/comm/cuda_self_comm.cuh"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/error.cuh"
#include "foe/cuda/gemm.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/model.cuh"
#include "foe/experts/combine.cuh"
#include "foe/experts/grouped_swiglu.cuh"
#include "foe/experts/permute.cuh"
#include "foe/experts/swiglu_experts.cuh"
#include "foe/experts/swiglu_reference.cuh"
#include "foe/layer/foe_layer.hpp"
#include "foe/layer/moe_layer.hpp"
#include "foe/ops/elementwise.cuh"
#include "foe/ops/rmsnorm.cuh"
#include "foe/ops/rope.cuh"
#include "foe/parallel/exchange_experts.cuh"
#include "foe/parallel/local_experts.cuh"
#include "foe/routing/router.cuh"
#include "foe/routing/router_kernel.cuh"
#include "foe/sync/all_reduce_mean.cuh"
#include "foe/sync/no_sync.cuh"
