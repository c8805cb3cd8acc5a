#pragma once
// foe's CUDA parts (needs nvcc, the CUDA runtime and cuBLASLt); foe/foe.hpp is the host library.

#include "foe/cuda/check.cuh"
#include "foe/cuda/combine.cuh"
#include "foe/cuda/decode_attention.cuh"
#include "foe/cuda/error.cuh"
#include "foe/cuda/gemm_lt.cuh"
#include "foe/cuda/permute.cuh"
#include "foe/cuda/rmsnorm.cuh"
#include "foe/cuda/rope.cuh"
#include "foe/cuda/router.cuh"
#include "foe/cuda/swiglu_experts.cuh"
