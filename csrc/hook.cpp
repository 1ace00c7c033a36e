// pyrefusal/csrc/hook.cpp
//
// Implementation of the residual-stream hook (see hook.h). Host tensors are edited in
// place through their data pointer; device tensors either in place by our CUDA kernel
// (PYREFUSAL_CUDA builds, CUDA buffers) or through the generic ggml backend copy
// functions: ggml_backend_tensor_get -> edit on the host -> ggml_backend_tensor_set,
// which works for every ggml backend.
//
// llama.cpp symbols relied on (ggml 0.25.3, vendored in llama-cpp-python 0.3.36):
//   typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);
//   bool ggml_backend_buffer_is_host(ggml_backend_buffer_t buffer);
//   void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
//   void ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data, size_t offset, size_t size);
//   const char * ggml_backend_buft_name(ggml_backend_buffer_type_t buft);

#include "hook.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <exception>

#include "ggml-backend.h"
#include "ggml.h"

#ifdef PYREFUSAL_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace pyrefusal {

Hook::Hook(int n_embd) : n_embd_(n_embd) {
#ifdef PYREFUSAL_WITH_CUDA
    cuda_state_ = cuda::create_state();
#endif
}

Hook::~Hook() {
#ifdef PYREFUSAL_WITH_CUDA
    cuda::destroy_state(cuda_state_);
#endif
}

bool Hook::cuda_compiled() {
#ifdef PYREFUSAL_WITH_CUDA
    return true;
#else
    return false;
#endif
}

void Hook::set_directions(const float * data, int k) {
    std::lock_guard<std::mutex> lock(mu_);
    n_dirs_ = k;
    dirs_.assign(data, data + static_cast<size_t>(k) * n_embd_);
#ifdef PYREFUSAL_WITH_CUDA
    const std::string err = cuda::upload(cuda_state_, dirs_, n_dirs_, additions_, n_embd_);
    if (!err.empty()) error_ = err;
#endif
}

int Hook::add_vector(const float * data) {
    std::lock_guard<std::mutex> lock(mu_);
    additions_.emplace_back(data, data + n_embd_);
#ifdef PYREFUSAL_WITH_CUDA
    const std::string err = cuda::upload(cuda_state_, dirs_, n_dirs_, additions_, n_embd_);
    if (!err.empty()) error_ = err;
#endif
    return static_cast<int>(additions_.size()) - 1;
}

void Hook::set_plan(const std::unordered_map<std::string, NodeOps> & plan) {
    std::lock_guard<std::mutex> lock(mu_);
    plan_ = plan;
    index_plan();
}

void Hook::index_plan() {
    plan_first_.fill(false);
    plan_min_len_ = plan_.empty() ? 1 : SIZE_MAX;
    plan_max_len_ = 0;
    for (const auto & kv : plan_) {
        const std::string & name = kv.first;
        if (name.empty()) continue;
        plan_first_[static_cast<unsigned char>(name[0])] = true;
        plan_min_len_ = std::min(plan_min_len_, name.size());
        plan_max_len_ = std::max(plan_max_len_, name.size());
    }
}

const NodeOps * Hook::find_ops(const char * name) {
    if (name == nullptr || !plan_first_[static_cast<unsigned char>(name[0])]) return nullptr;
    const size_t len = std::strlen(name);
    if (len < plan_min_len_ || len > plan_max_len_) return nullptr;
    name_buf_.assign(name, len);
    auto it = plan_.find(name_buf_);
    return it == plan_.end() ? nullptr : &it->second;
}

void Hook::clear() {
    std::lock_guard<std::mutex> lock(mu_);
    plan_.clear();
    index_plan();
    dirs_.clear();
    n_dirs_ = 0;
    additions_.clear();
    rows_full_.clear();
    rows_out_.clear();
}

void Hook::set_capture_buffer(int n_slots, int n_layers) {
    std::lock_guard<std::mutex> lock(mu_);
    cap_slots_ = n_slots;
    cap_layers_ = n_layers;
    capture_.assign(static_cast<size_t>(n_slots) * n_layers * n_embd_, 0.0f);
}

void Hook::set_capture_rows(const std::vector<int> & full, const std::vector<int> & out) {
    std::lock_guard<std::mutex> lock(mu_);
    rows_full_ = full;
    rows_out_ = out;
}

void Hook::set_record_names(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    record_names_ = on;
    names_.clear();
}

std::vector<std::string> Hook::recorded_names() const {
    std::lock_guard<std::mutex> lock(mu_);
    return names_;
}

std::string Hook::take_error() {
    std::lock_guard<std::mutex> lock(mu_);
    std::string e;
    e.swap(error_);
    return e;
}

void Hook::fail(const std::string & msg) {
    if (error_.empty()) error_ = msg;
}

// --- the callback -------------------------------------------------------------------------

/**
 * @brief ggml scheduler eval callback.
 *
 * Ask phase (ask == true): return true for the nodes named in the plan, so the scheduler
 * computes the graph up to that node, synchronises, and calls us again with the data.
 * Data phase (ask == false): edit/capture the node; returning false cancels the compute.
 */
bool Hook::callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * self = static_cast<Hook *>(user_data);
    try {
        std::lock_guard<std::mutex> lock(self->mu_);
        if (ask) return self->on_ask(t);
        const auto t0 = std::chrono::steady_clock::now();
        const bool ok = self->on_data(t);
        self->stats_.data_ns +=
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
        return ok;
    } catch (const std::exception & e) {
        self->fail(std::string("pyrefusal hook: ") + e.what());
    } catch (...) {
        self->fail("pyrefusal hook: unknown C++ exception");
    }
    return false;
}

bool Hook::on_ask(const ggml_tensor * t) {
    stats_.asked++;
    if (record_names_) names_.emplace_back(t->name);
    if (!error_.empty()) return false;
    return find_ops(t->name) != nullptr;
}

const std::vector<int> * Hook::row_map_for(int64_t n_rows) {
    if (static_cast<int64_t>(rows_full_.size()) == n_rows) return &rows_full_;
    if (static_cast<int64_t>(rows_out_.size()) == n_rows) return &rows_out_;
    return nullptr;
}

void Hook::apply_rows(float * rows, int64_t n_rows, const NodeOps & ops, const std::vector<int> * row_map) {
    const int n = n_embd_;
    const std::vector<float> * add = ops.add_index >= 0 ? &additions_[ops.add_index] : nullptr;
    for (int64_t r = 0; r < n_rows; ++r) {
        float * x = rows + r * n;
        if (ops.ablate && n_dirs_ > 0) {
            // Directions are orthonormal, so subtracting the projections one after another
            // removes the whole span. Dot products accumulate in double: a 4096-wide f32 dot
            // loses ~1e-4 relative precision, enough to leave a visible residual projection.
            for (int k = 0; k < n_dirs_; ++k) {
                const float * d = dirs_.data() + static_cast<size_t>(k) * n;
                double dot = 0.0;
                for (int i = 0; i < n; ++i) dot += static_cast<double>(x[i]) * d[i];
                const float p = static_cast<float>(dot);
                for (int i = 0; i < n; ++i) x[i] -= p * d[i];
            }
            stats_.rows_ablated++;
        }
        if (add != nullptr) {
            const float * v = add->data();
            for (int i = 0; i < n; ++i) x[i] += v[i];
            stats_.rows_added++;
        }
        if (ops.capture_layer >= 0 && row_map != nullptr) {
            const int slot = (*row_map)[r];
            if (slot >= 0) {
                float * dst = capture_.data() +
                              (static_cast<size_t>(slot) * cap_layers_ + ops.capture_layer) * n;
                std::memcpy(dst, x, sizeof(float) * n);
                stats_.rows_captured++;
            }
        }
    }
}

bool Hook::on_data(ggml_tensor * t) {
    const NodeOps * found = find_ops(t->name);
    if (found == nullptr) return true;  // asked by an earlier plan; nothing to do now
    const NodeOps & ops = *found;
    stats_.observed++;

    const int64_t n_embd = t->ne[0];
    const int64_t n_rows = ggml_nrows(t);
    if (n_embd != n_embd_) {
        fail(std::string("pyrefusal hook: node '") + t->name + "' has width " + std::to_string(n_embd) +
             " but the hook was built for n_embd=" + std::to_string(n_embd_) +
             "; the plan names a node that is not on the residual stream");
        return false;
    }
    if (!ggml_is_contiguous(t)) {
        fail(std::string("pyrefusal hook: node '") + t->name + "' is not contiguous; cannot edit it in place");
        return false;
    }
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_BF16) {
        fail(std::string("pyrefusal hook: node '") + t->name + "' has type " + ggml_type_name(t->type) +
             "; only f32/f16/bf16 residual streams are supported");
        return false;
    }

    const std::vector<int> * row_map = nullptr;
    if (ops.capture_layer >= 0) {
        if (ops.capture_layer >= cap_layers_) {
            fail("pyrefusal hook: capture layer index out of range of the capture buffer");
            return false;
        }
        row_map = row_map_for(n_rows);
        if (row_map == nullptr) {
            fail(std::string("pyrefusal hook: node '") + t->name + "' has " + std::to_string(n_rows) +
                 " rows, matching neither the batch (" + std::to_string(rows_full_.size()) +
                 ") nor its outputs (" + std::to_string(rows_out_.size()) +
                 "); submit one ubatch per decode (n_ubatch >= tokens per decode)");
            return false;
        }
        for (int slot : *row_map) {
            if (slot >= cap_slots_) {
                fail("pyrefusal hook: capture slot out of range of the capture buffer");
                return false;
            }
        }
    }

    const bool is_host = t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer);
    const size_t n_elem = static_cast<size_t>(n_rows) * n_embd;
    const bool modifies = (ops.ablate && n_dirs_ > 0) || ops.add_index >= 0;

    if (is_host && t->type == GGML_TYPE_F32) {
        apply_rows(static_cast<float *>(t->data), n_rows, ops, row_map);
        return true;
    }

    if (!is_host) {
        stats_.device_nodes++;
#ifdef PYREFUSAL_WITH_CUDA
        const char * buft = ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer));
        if (t->type == GGML_TYPE_F32 && buft != nullptr && std::strncmp(buft, "CUDA", 4) == 0 &&
            cuda::same_device(cuda_state_, t->data)) {
            float * rows = static_cast<float *>(t->data);
            if (modifies) {
                std::string err = cuda::apply_inplace(cuda_state_, rows, n_rows, n_embd_, ops.ablate && n_dirs_ > 0,
                                                      ops.add_index);
                if (!err.empty()) {
                    fail("pyrefusal hook (CUDA): " + err);
                    return false;
                }
                if (ops.ablate && n_dirs_ > 0) stats_.rows_ablated += n_rows;
                if (ops.add_index >= 0) stats_.rows_added += n_rows;
            }
            if (row_map != nullptr) {
                // one gather kernel + one device-to-host copy for all captured rows of the node
                gather_rows_.clear();
                gather_slots_.clear();
                for (int64_t r = 0; r < n_rows; ++r) {
                    const int slot = (*row_map)[r];
                    if (slot < 0) continue;
                    gather_rows_.push_back(static_cast<int>(r));
                    gather_slots_.push_back(slot);
                }
                const float * host = nullptr;
                std::string err = cuda::gather_rows_to_host(cuda_state_, rows, n_embd_, gather_rows_, &host);
                if (!err.empty()) {
                    fail("pyrefusal hook (CUDA): " + err);
                    return false;
                }
                for (size_t j = 0; j < gather_slots_.size(); ++j) {
                    float * dst = capture_.data() +
                                  (static_cast<size_t>(gather_slots_[j]) * cap_layers_ + ops.capture_layer) * n_embd_;
                    std::memcpy(dst, host + j * static_cast<size_t>(n_embd_), sizeof(float) * n_embd_);
                }
                stats_.rows_captured += static_cast<int64_t>(gather_slots_.size());
            }
            stats_.cuda_kernel_nodes++;
            return true;
        }
#endif
    }

    // Generic path: bring the rows to the host as f32, edit, write back if modified.
    scratch_.resize(n_elem);
    const size_t elem_size = ggml_type_size(t->type);
    if (t->type == GGML_TYPE_F32) {
        if (is_host) {
            std::memcpy(scratch_.data(), t->data, n_elem * sizeof(float));
        } else {
            ggml_backend_tensor_get(t, scratch_.data(), 0, n_elem * sizeof(float));
        }
    } else {
        std::vector<uint8_t> raw(n_elem * elem_size);
        if (is_host) {
            std::memcpy(raw.data(), t->data, raw.size());
        } else {
            ggml_backend_tensor_get(t, raw.data(), 0, raw.size());
        }
        if (t->type == GGML_TYPE_F16) {
            ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(raw.data()), scratch_.data(), n_elem);
        } else {
            ggml_bf16_to_fp32_row(reinterpret_cast<const ggml_bf16_t *>(raw.data()), scratch_.data(), n_elem);
        }
    }

    apply_rows(scratch_.data(), n_rows, ops, row_map);

    if (modifies) {
        if (t->type == GGML_TYPE_F32) {
            if (is_host) {
                std::memcpy(t->data, scratch_.data(), n_elem * sizeof(float));
            } else {
                ggml_backend_tensor_set(t, scratch_.data(), 0, n_elem * sizeof(float));
            }
        } else {
            std::vector<uint8_t> raw(n_elem * elem_size);
            if (t->type == GGML_TYPE_F16) {
                ggml_fp32_to_fp16_row(scratch_.data(), reinterpret_cast<ggml_fp16_t *>(raw.data()), n_elem);
            } else {
                ggml_fp32_to_bf16_row(scratch_.data(), reinterpret_cast<ggml_bf16_t *>(raw.data()), n_elem);
            }
            if (is_host) {
                std::memcpy(t->data, raw.data(), raw.size());
            } else {
                ggml_backend_tensor_set(t, raw.data(), 0, raw.size());
            }
        }
    }
    return true;
}

}  // namespace pyrefusal
