// pyrefusal/csrc/hook.h
//
// The residual-stream hook that pyrefusal installs as llama.cpp's eval callback
// (`llama_context_params.cb_eval`). It is the only code of pyrefusal that runs inside
// llama.cpp's compute graph, and it does four things to chosen graph nodes, in this order:
//
//   1. directional ablation   x <- x - sum_k (x . d_k) d_k   (d_k orthonormal, every row)
//   2. activation addition    x <- x + v                     (v already scaled by alpha)
//   3. capture                copy chosen rows into a host buffer (slot, layer, n_embd)
//
// The plan (which node gets which operation) is built in Python, where the model's
// architecture and node names are known; this file knows nothing about architectures.
// Nodes are matched by their exact ggml name ("l_out-12", "ffn_inp-3", "embd").
//
// No C++ exception ever crosses the C callback: an error is recorded in the hook, the
// callback returns false (llama.cpp then cancels the graph compute and llama_decode fails),
// and Python raises the recorded message afterwards.
//
// This header is plain C++: no pybind11, no Python types (bindings.cpp owns those).

#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

struct ggml_tensor;

namespace pyrefusal {

/// What the hook does to one graph node, identified by name.
struct NodeOps {
    bool ablate = false;       ///< project out the ablation directions from every row
    int add_index = -1;        ///< index into Hook::additions_, applied after ablation; -1 = none
    int capture_layer = -1;    ///< layer slot of the capture buffer; -1 = no capture
};

/// Per-call counters, for tests and diagnostics.
struct HookStats {
    int64_t asked = 0;         ///< nodes the scheduler asked about
    int64_t observed = 0;      ///< nodes we handled in the data phase
    int64_t rows_ablated = 0;  ///< rows projected
    int64_t rows_added = 0;    ///< rows that received an addition
    int64_t rows_captured = 0; ///< rows copied to the capture buffer
    int64_t device_nodes = 0;  ///< handled nodes whose data lived in device memory
    int64_t cuda_kernel_nodes = 0; ///< device nodes handled in place by our CUDA kernel
    int64_t data_ns = 0;       ///< wall time spent in the data phase (our edits, copies, syncs)
};

class Hook {
public:
    explicit Hook(int n_embd);
    ~Hook();

    Hook(const Hook &) = delete;
    Hook & operator=(const Hook &) = delete;

    int n_embd() const { return n_embd_; }

    /// Set k orthonormal ablation directions, row-major (k, n_embd). k = 0 clears them.
    void set_directions(const float * data, int k);
    int n_directions() const { return n_dirs_; }

    /// Register an addition vector (n_embd floats, alpha already applied); returns its index.
    int add_vector(const float * data);

    /// Replace the whole node plan.
    void set_plan(const std::unordered_map<std::string, NodeOps> & plan);
    /// Drop plan, directions and additions (capture buffer is kept).
    void clear();

    /// Configure the capture buffer (n_slots, n_layers, n_embd), zero-filled.
    void set_capture_buffer(int n_slots, int n_layers);
    /// Row -> slot maps for the next decode. `full` is used for tensors with one row per batch
    /// token (its length must be the batch size), `out` for tensors pruned to the output rows
    /// (the last layer of most architectures). -1 means "do not capture this row".
    void set_capture_rows(const std::vector<int> & full, const std::vector<int> & out);
    const std::vector<float> & capture_buffer() const { return capture_; }
    int capture_slots() const { return cap_slots_; }
    int capture_layers() const { return cap_layers_; }

    /// Record the names of every node the scheduler asks about (for listing an architecture's graph).
    void set_record_names(bool on);
    std::vector<std::string> recorded_names() const;

    /// Error recorded inside the callback ("" when none); take_error() also clears it.
    std::string take_error();
    const HookStats & stats() const { return stats_; }
    void reset_stats() { stats_ = HookStats{}; }

    /// The callback itself: `bool cb(ggml_tensor * t, bool ask, void * user_data)`
    /// (ggml_backend_sched_eval_callback, ggml-backend.h). `user_data` is the Hook.
    static bool callback(ggml_tensor * t, bool ask, void * user_data);

    /// Whether this build has the CUDA in-place kernel.
    static bool cuda_compiled();

private:
    bool on_ask(const ggml_tensor * t);
    bool on_data(ggml_tensor * t);
    void apply_rows(float * rows, int64_t n_rows, const NodeOps & ops, const std::vector<int> * row_map);
    const std::vector<int> * row_map_for(int64_t n_rows);
    void fail(const std::string & msg);
    void index_plan();                           // refresh the rejection filter from plan_
    const NodeOps * find_ops(const char * name); // the plan's entry for a node name, or null

    int n_embd_;
    int n_dirs_ = 0;
    std::vector<float> dirs_;                    // (n_dirs, n_embd)
    std::vector<std::vector<float>> additions_;  // each (n_embd,)
    std::unordered_map<std::string, NodeOps> plan_;
    // Cheap rejection before the hash lookup: the scheduler asks about every node of every graph
    // (~1000 per decode of a 7B model), and only a few dozen are in the plan.
    std::array<bool, 256> plan_first_{};         // first characters of the planned names
    size_t plan_min_len_ = 0, plan_max_len_ = 0; // their length range
    std::string name_buf_;                       // reused for lookups

    int cap_slots_ = 0;
    int cap_layers_ = 0;
    std::vector<float> capture_;                 // (n_slots, n_layers, n_embd)
    std::vector<int> rows_full_;
    std::vector<int> rows_out_;

    bool record_names_ = false;
    std::vector<std::string> names_;

    std::vector<float> scratch_;                 // host copy of a device / half tensor
    std::vector<int> gather_rows_;               // CUDA capture: rows of the node to copy
    std::vector<int> gather_slots_;              // ... and the capture slot of each
    std::string error_;
    HookStats stats_;
    mutable std::mutex mu_;

    void * cuda_state_ = nullptr;                // owned by cuda/kernels.cu when compiled
};

}  // namespace pyrefusal
