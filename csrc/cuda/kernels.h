// pyrefusal/csrc/cuda/kernels.h
//
// In-place CUDA versions of the hook's row operations, used when a hooked node lives in a
// CUDA buffer. Compiled only with PYREFUSAL_CUDA=ON. The interface is plain C++ so hook.cpp
// does not need the CUDA headers.
//
// Synchronisation: the ggml scheduler synchronises the split's backend before calling the
// eval callback, and these functions synchronise their own stream before returning, so
// the edit (or the copy) is complete before the next graph view is launched on ggml's stream.
//
// Devices: the state (directions, additions, stream, staging buffers) lives on the device that
// was current at the first upload. A node on another device (a model split over several GPUs)
// is reported by `same_device` as false and hook.cpp takes the generic copy path for it.

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

/// Whether device pointer `ptr` is on the state's device (choosing that device on first use).
bool same_device(void * state, const void * ptr);

/// Edit `n_rows` contiguous f32 rows of length n_embd at device pointer `rows` in place:
/// ablate (if `ablate`), then add addition `add_index` (if >= 0). Returns "" or an error.
std::string apply_inplace(void * state, float * rows, int64_t n_rows, int n_embd, bool ablate,
                          int add_index);

/// Gather rows `row_idx` (each of n_embd f32) of the device tensor `rows` into pinned host
/// memory with one kernel and one device-to-host copy. On success `*host_out` points at
/// (row_idx.size(), n_embd) floats, valid until the next call on this state.
std::string gather_rows_to_host(void * state, const float * rows, int n_embd, const std::vector<int> & row_idx,
                                const float ** host_out);

}  // namespace pyrefusal::cuda
