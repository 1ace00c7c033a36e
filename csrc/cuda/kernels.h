// pyrefusal/csrc/cuda/kernels.h
//
// In-place CUDA versions of the hook's row operations, used when a hooked node lives in a
// CUDA buffer. Compiled only with PYREFUSAL_CUDA=ON. The interface is plain C++ so hook.cpp
// does not need the CUDA headers.
//
// Synchronisation: the ggml scheduler synchronises the split's backend before calling the
// eval callback, and these functions synchronise their own stream before returning, so
// the edit is complete before the next graph view is launched.

#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pyrefusal::cuda {

/// Opaque per-hook device state (device copies of the directions and addition vectors).
void * create_state();
void destroy_state(void * state);

/// Upload host data (called when the plan changes); returns "" or an error message.
std::string upload(void * state, const std::vector<float> & dirs, int n_dirs,
                   const std::vector<std::vector<float>> & additions, int n_embd);

/// Edit `n_rows` contiguous f32 rows of length n_embd at device pointer `rows` in place:
/// ablate (if `ablate`), then add addition `add_index` (if >= 0). Returns "" or an error.
std::string apply_inplace(void * state, float * rows, int64_t n_rows, int n_embd, bool ablate,
                          int add_index);

/// Copy row `row` of a device tensor to host memory `dst` (n_embd floats).
std::string copy_row_to_host(const float * rows, int64_t row, int n_embd, float * dst);

}  // namespace pyrefusal::cuda
