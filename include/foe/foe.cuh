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
//   layer      layer.cuh: cuda::Layer, an FoE or MoE layer over planned device memory
//   model      model.cuh: cuda::CudaModel, the ModelInterface on a GPU, decode steps in CUDA graphs

#include "foe/cuda/arena.cuh"
#include "foe/cuda/batch.cuh"
#include "foe/cuda/check.cuh"
#include "foe/cuda/combine.cuh"
#include "foe/cuda/decode_attention.cuh"
#include "foe/cuda/elementwise.cuh"
#include "foe/cuda/error.cuh"
#include "foe/cuda/gemm.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/gemm_tc.cuh"
#include "foe/cuda/grouped_swiglu.cuh"
#include "foe/cuda/kv_cache.cuh"
#include "foe/cuda/kv_layout.cuh"
#include "foe/cuda/layer.cuh"
#include "foe/cuda/model.cuh"
#include "foe/cuda/permute.cuh"
#include "foe/cuda/prefill_attention.cuh"
#include "foe/cuda/rmsnorm.cuh"
#include "foe/cuda/rope.cuh"
#include "foe/cuda/router.cuh"
#include "foe/cuda/swiglu_experts.cuh"
