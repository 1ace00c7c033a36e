// pyrefusal/csrc/cuda/kernels.cu
//
// CUDA kernels of the residual-stream hook on device tensors (see kernels.h for the contract):
//
// * ablate_add_kernel: one thread block per row computes the projections on all ablation
//   directions (block reduction, double accumulation, as the CPU path), subtracts them, and
//   adds the addition vector: the whole edit in one launch for every row of the node.
// * gather_rows_kernel: copies the rows a capture wants into a contiguous staging buffer, so
//   that a node costs one device-to-host copy, not one per captured row.

#include "kernels.h"

#include <cuda_runtime.h>

#include <string>

namespace pyrefusal::cuda {
namespace {

constexpr int kThreads = 256;

struct State {
    int device = -1;             // device of everything below; -1 until first use
    cudaStream_t stream = nullptr;
    float * dirs = nullptr;      // (n_dirs, n_embd) device
    int n_dirs = 0;
    float * adds = nullptr;      // (n_adds, n_embd) device
    int n_adds = 0;
    int n_embd = 0;
    // capture staging: row indices (host pinned -> device) and gathered rows (device -> host pinned)
    int * idx_host = nullptr;
    int * idx_dev = nullptr;
    size_t idx_cap = 0;          // elements
    float * stage_dev = nullptr;
    float * stage_host = nullptr;
    size_t stage_cap = 0;        // floats
};

std::string check(cudaError_t err, const char * what) {
    if (err == cudaSuccess) return {};
    return std::string(what) + ": " + cudaGetErrorString(err);
}

/// Makes the state's device current for the lifetime of the guard, restoring the caller's after.
class DeviceGuard {
public:
    explicit DeviceGuard(int device) {
        if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
        if (device >= 0 && device != prev_) {
            switched_ = cudaSetDevice(device) == cudaSuccess;
        }
    }
    ~DeviceGuard() {
        if (switched_ && prev_ >= 0) cudaSetDevice(prev_);
    }
    DeviceGuard(const DeviceGuard &) = delete;
    DeviceGuard & operator=(const DeviceGuard &) = delete;

private:
    int prev_ = -1;
    bool switched_ = false;
};

/// Picks the current device on first use and creates the stream there.
std::string ensure_stream(State * s) {
    if (s->device < 0) {
        std::string err = check(cudaGetDevice(&s->device), "cudaGetDevice");
        if (!err.empty()) return err;
    }
    if (s->stream == nullptr) {
        DeviceGuard guard(s->device);
        return check(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking), "cudaStreamCreate");
    }
    return {};
}

// Block-wide sum of one double per thread; result valid in every thread.
__device__ double block_sum(double v, double * shared) {
    const int tid = threadIdx.x;
    shared[tid] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) shared[tid] += shared[tid + s];
        __syncthreads();
    }
    const double total = shared[0];
    __syncthreads();
    return total;
}

// rows: (n_rows, n_embd), one block per row; dirs: (n_dirs, n_embd) orthonormal; add: (n_embd,) or null
__global__ void ablate_add_kernel(float * rows, int n_embd, const float * dirs, int n_dirs, const float * add) {
    __shared__ double shared[kThreads];
    float * x = rows + static_cast<size_t>(blockIdx.x) * n_embd;
    for (int k = 0; k < n_dirs; ++k) {
        const float * d = dirs + static_cast<size_t>(k) * n_embd;
        double part = 0.0;
        for (int i = threadIdx.x; i < n_embd; i += blockDim.x) part += static_cast<double>(x[i]) * d[i];
        const float p = static_cast<float>(block_sum(part, shared));
        for (int i = threadIdx.x; i < n_embd; i += blockDim.x) x[i] -= p * d[i];
        __syncthreads();
    }
    if (add != nullptr) {
        for (int i = threadIdx.x; i < n_embd; i += blockDim.x) x[i] += add[i];
    }
}

// out[j] = rows[idx[j]], one block per selected row; rows: (n_rows, n_embd), out: (n_sel, n_embd)
__global__ void gather_rows_kernel(const float * rows, int n_embd, const int * idx, float * out) {
    const float * src = rows + static_cast<size_t>(idx[blockIdx.x]) * n_embd;
    float * dst = out + static_cast<size_t>(blockIdx.x) * n_embd;
    for (int i = threadIdx.x; i < n_embd; i += blockDim.x) dst[i] = src[i];
}

void free_staging(State * s) {
    if (s->idx_host) cudaFreeHost(s->idx_host);
    if (s->idx_dev) cudaFree(s->idx_dev);
    if (s->stage_host) cudaFreeHost(s->stage_host);
    if (s->stage_dev) cudaFree(s->stage_dev);
    s->idx_host = s->idx_dev = nullptr;
    s->stage_host = s->stage_dev = nullptr;
    s->idx_cap = s->stage_cap = 0;
}

// Grow a pinned host buffer and its device twin to hold at least `n` elements.
template <typename T>
std::string reserve_pair(T ** host, T ** dev, size_t * cap, size_t n) {
    if (n <= *cap) return {};
    if (*host) cudaFreeHost(*host);
    if (*dev) cudaFree(*dev);
    *host = *dev = nullptr;
    *cap = 0;
    std::string err = check(cudaMallocHost(reinterpret_cast<void **>(host), sizeof(T) * n), "cudaMallocHost");
    if (err.empty()) err = check(cudaMalloc(reinterpret_cast<void **>(dev), sizeof(T) * n), "cudaMalloc");
    if (err.empty()) *cap = n;
    return err;
}

std::string reserve_staging(State * s, size_t n_idx, size_t n_floats) {
    std::string err = reserve_pair(&s->idx_host, &s->idx_dev, &s->idx_cap, n_idx);
    if (!err.empty()) return err;
    return reserve_pair(&s->stage_host, &s->stage_dev, &s->stage_cap, n_floats);
}

}  // namespace

void * create_state() { return new State(); }

void destroy_state(void * state) {
    auto * s = static_cast<State *>(state);
    if (s == nullptr) return;
    {
        DeviceGuard guard(s->device);
        if (s->dirs) cudaFree(s->dirs);
        if (s->adds) cudaFree(s->adds);
        free_staging(s);
        if (s->stream) cudaStreamDestroy(s->stream);
    }
    delete s;
}

std::string upload(void * state, const std::vector<float> & dirs, int n_dirs,
                   const std::vector<std::vector<float>> & additions, int n_embd) {
    auto * s = static_cast<State *>(state);
    int device_count = 0;
    if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
        cudaGetLastError();  // no device: the generic path will be used; nothing to upload
        return {};
    }
    std::string err = ensure_stream(s);
    if (!err.empty()) return err;
    DeviceGuard guard(s->device);
    if (s->dirs) cudaFree(s->dirs);
    if (s->adds) cudaFree(s->adds);
    s->dirs = nullptr;
    s->adds = nullptr;
    s->n_embd = n_embd;
    s->n_dirs = n_dirs;
    s->n_adds = static_cast<int>(additions.size());
    if (n_dirs > 0) {
        const size_t bytes = sizeof(float) * static_cast<size_t>(n_dirs) * n_embd;
        err = check(cudaMalloc(&s->dirs, bytes), "cudaMalloc");
        if (!err.empty()) return err;
        err = check(cudaMemcpy(s->dirs, dirs.data(), bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
        if (!err.empty()) return err;
    }
    if (!additions.empty()) {
        const size_t row = sizeof(float) * static_cast<size_t>(n_embd);
        err = check(cudaMalloc(&s->adds, row * additions.size()), "cudaMalloc");
        if (!err.empty()) return err;
        for (size_t a = 0; a < additions.size(); ++a) {
            err = check(cudaMemcpy(reinterpret_cast<char *>(s->adds) + a * row, additions[a].data(), row,
                                   cudaMemcpyHostToDevice),
                        "cudaMemcpy");
            if (!err.empty()) return err;
        }
    }
    return {};
}

bool same_device(void * state, const void * ptr) {
    auto * s = static_cast<State *>(state);
    cudaPointerAttributes attr{};
    // cudaMalloc'd (ggml's compute buffers) or managed (GGML_CUDA_ENABLE_UNIFIED_MEMORY) memory
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess ||
        (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
        cudaGetLastError();
        return false;
    }
    if (s->device < 0) s->device = attr.device;
    return attr.device == s->device;
}

std::string apply_inplace(void * state, float * rows, int64_t n_rows, int n_embd, bool ablate, int add_index) {
    auto * s = static_cast<State *>(state);
    if (s->stream == nullptr || n_embd != s->n_embd) return "device state not uploaded (set the plan first)";
    if (add_index >= s->n_adds) return "addition index out of range";
    if (n_rows == 0) return {};
    DeviceGuard guard(s->device);
    const float * add = add_index >= 0 ? s->adds + static_cast<size_t>(add_index) * n_embd : nullptr;
    ablate_add_kernel<<<static_cast<unsigned>(n_rows), kThreads, 0, s->stream>>>(rows, n_embd, s->dirs,
                                                                                ablate ? s->n_dirs : 0, add);
    std::string err = check(cudaGetLastError(), "kernel launch");
    if (!err.empty()) return err;
    return check(cudaStreamSynchronize(s->stream), "cudaStreamSynchronize");
}

std::string gather_rows_to_host(void * state, const float * rows, int n_embd, const std::vector<int> & row_idx,
                                const float ** host_out) {
    auto * s = static_cast<State *>(state);
    *host_out = nullptr;
    if (row_idx.empty()) return {};
    std::string err = ensure_stream(s);
    if (!err.empty()) return err;
    DeviceGuard guard(s->device);
    const size_t n_sel = row_idx.size();
    err = reserve_staging(s, n_sel, n_sel * static_cast<size_t>(n_embd));
    if (!err.empty()) return err;
    for (size_t j = 0; j < n_sel; ++j) s->idx_host[j] = row_idx[j];
    err = check(cudaMemcpyAsync(s->idx_dev, s->idx_host, sizeof(int) * n_sel, cudaMemcpyHostToDevice, s->stream),
                "cudaMemcpyAsync");
    if (!err.empty()) return err;
    gather_rows_kernel<<<static_cast<unsigned>(n_sel), kThreads, 0, s->stream>>>(rows, n_embd, s->idx_dev,
                                                                                s->stage_dev);
    err = check(cudaGetLastError(), "kernel launch");
    if (!err.empty()) return err;
    err = check(cudaMemcpyAsync(s->stage_host, s->stage_dev, sizeof(float) * n_sel * n_embd, cudaMemcpyDeviceToHost,
                                s->stream),
                "cudaMemcpyAsync");
    if (!err.empty()) return err;
    err = check(cudaStreamSynchronize(s->stream), "cudaStreamSynchronize");
    if (!err.empty()) return err;
    *host_out = s->stage_host;
    return {};
}

}  // namespace pyrefusal::cuda
