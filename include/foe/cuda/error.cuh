#pragma once
// The typed exception of foe's CUDA layer (a foe::Error, so `catch (const foe::Error&)` still
// catches everything the library throws on purpose).

#include "foe/core/error.hpp"

namespace foe {

/// A CUDA runtime, cuBLASLt or kernel-launch call failed; the message names the call site
/// (file:line), the status and the runtime's description of it.
class CudaError : public Error {
public:
    using Error::Error;
};

}  // namespace foe
