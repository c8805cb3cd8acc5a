#pragma once
// foe's CUDA parts (needs nvcc, the CUDA runtime and cuBLASLt); foe/foe.hpp is the host library.
// The NCCL communicator is separate (foe/comm/nccl_comm.cuh; it needs NCCL), and so is expert
// parallelism over it (foe/parallel/all_to_all_ep.cuh: DeviceAllToAllEP, naive and deduplicated
// dispatch, dynamic or fixed capacity).
//
//   kernels    rmsnorm, rope, kv_cache, prefill_attention, decode_attention, router, permute,
//              grouped_swiglu (device offsets), swiglu_experts (per-expert cuBLASLt reference),
//              combine, elementwise
//   GEMMs      gemm.cuh (the DeviceGemmPolicy concept), gemm_lt.cuh (cuBLASLt), gemm_tc.cuh (foe's own)
//   policies   the device policies a layer is composed from (FoeLayer / MoeLayer over them run
//              on a CUDA stream, cuda/layer_exec.cuh): attention/gqa_attention.cuh, routing/router.cuh,
//              experts/swiglu_experts.cuh, parallel/local_experts.cuh, parallel/exchange_experts.cuh,
//              sync/all_reduce_mean.cuh (over comm/cuda_self_comm.cuh or NcclComm), sync/no_sync.cuh;
//              cuda/context.cuh: the stream and scratch of their calls
//   model      model.cuh: cuda::CudaModel, the ModelInterface on a GPU, decode steps in CUDA graphs

#include "foe/attention/gqa_attention.cuh"
#include "foe/comm/cuda_self_comm.cuh"
#include "foe/cuda/arena.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/combine.cuh"
#include "foe/cuda/context.cuh"
#include "foe/cuda/decode_attention.cuh"
#include "foe/cuda/elementwise.cuh"
#include "foe/cuda/error.cuh"
#include "foe/cuda/gemm.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/grouped_swiglu.cuh"
#include "foe/cuda/kv_cache.cuh"
#include "foe/cuda/kv_layout.cuh"
#include "foe/cuda/model.cuh"
#include "foe/cuda/permute.cuh"
#include "foe/cuda/prefill_attention.cuh"
#include "foe/cuda/rmsnorm.cuh"
#include "foe/cuda/rope.cuh"
#include "foe/cuda/router.cuh"
#include "foe/cuda/swiglu_experts.cuh"
#include "foe/experts/swiglu_experts.cuh"
#include "foe/layer/foe_layer.hpp"
#include "foe/layer/moe_layer.hpp"
#include "foe/parallel/exchange_experts.cuh"
#include "foe/parallel/local_experts.cuh"
#include "foe/routing/router.cuh"
#include "foe/sync/all_reduce_mean.cuh"
#include "foe/sync/no_sync.cuh"
