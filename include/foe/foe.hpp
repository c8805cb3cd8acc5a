#pragma once
// foe: Federation-of-Experts inference, header-only C++20. This umbrella header brings in every
// part that compiles with a plain C++ compiler (foe.cuh adds the CUDA parts).

#include "foe/core/config.hpp"
#include "foe/core/dtype.hpp"
#include "foe/core/error.hpp"
#include "foe/core/half.hpp"
#include "foe/core/rng.hpp"
#include "foe/core/tensor.hpp"
#include "foe/core/types.hpp"

#include "foe/comm/comm.hpp"
#include "foe/comm/counting_comm.hpp"
#include "foe/comm/hierarchical_comm.hpp"
#include "foe/comm/self_comm.hpp"

#include "foe/ops/gemm.hpp"
#include "foe/ops/rmsnorm.hpp"
#include "foe/ops/rope.hpp"

#include "foe/attention/attention.hpp"
#include "foe/attention/gqa_attention.hpp"
#include "foe/attention/kv_cache.hpp"
#include "foe/attention/kv_layout.hpp"

#include "foe/routing/router.hpp"
#include "foe/routing/routing.hpp"
#include "foe/routing/scores.hpp"
#include "foe/routing/topk.hpp"

#include "foe/experts/experts.hpp"
#include "foe/experts/swiglu_experts.hpp"

#include "foe/parallel/all_to_all_ep.hpp"
#include "foe/parallel/dispatch_plan.hpp"
#include "foe/parallel/expert_parallel.hpp"
#include "foe/parallel/local_experts.hpp"
#include "foe/parallel/placement.hpp"

#include "foe/sync/all_reduce_mean.hpp"
#include "foe/sync/no_sync.hpp"
#include "foe/sync/residual_sync.hpp"

#include "foe/layer/batch.hpp"
#include "foe/layer/block_table.hpp"
#include "foe/layer/foe_layer.hpp"
#include "foe/layer/layer_options.hpp"
#include "foe/layer/layer_weights.hpp"
#include "foe/layer/moe_head_parallel_layer.hpp"
#include "foe/layer/moe_layer.hpp"

#include "foe/model/distributed.hpp"
#include "foe/model/host_model.hpp"
#include "foe/model/model.hpp"
#include "foe/model/sampling.hpp"
#include "foe/model/weights.hpp"

#include "foe/io/config_json.hpp"
#include "foe/io/json.hpp"
#include "foe/io/model_dir.hpp"
#include "foe/io/safetensors.hpp"

#include "foe/perf/cost_model.hpp"
#include "foe/perf/hardware.hpp"

#include "foe/serve/block_manager.hpp"
#include "foe/serve/scheduler.hpp"

// Not included: foe/comm/mpi_comm.hpp (needs <mpi.h>; include it and link MPI to use MpiComm).
