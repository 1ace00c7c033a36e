// pyrefusal/csrc/cuda/kernels.cu
//
// Fused in-place row kernel for the residual-stream hook on CUDA tensors: one thread block
// per row computes the projections on all ablation directions (block reduction, double
// accumulation), subtracts them, and adds the addition vector, in one pass over the row
// held in registers/shared memory. See kernels.h for the synchronisation contract.

#include "kernels.h"

#include <cuda_runtime.h>

#include <string>

namespace pyrefusal::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxDirs = 16;

struct State {
    float * dirs = nullptr;   // (n_dirs, n_embd) device
    int n_dirs = 0;
    float * adds = nullptr;   // (n_adds, n_embd) device
    int n_adds = 0;
    int n_embd = 0;
    cudaStream_t stream = nullptr;
};

std::string check(cudaError_t err, const char * what) {
    if (err == cudaSuccess) return {};
    return std::string(what) + ": " + cudaGetErrorString(err);
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

}  // namespace

void * create_state() { return new State(); }

void destroy_state(void * state) {
    auto * s = static_cast<State *>(state);
    if (s == nullptr) return;
    if (s->dirs) cudaFree(s->dirs);
    if (s->adds) cudaFree(s->adds);
    if (s->stream) cudaStreamDestroy(s->stream);
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
    if (n_dirs > kMaxDirs) return "at most 16 ablation directions are supported by the CUDA kernel";
    if (s->stream == nullptr) {
        std::string err = check(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking), "cudaStreamCreate");
        if (!err.empty()) return err;
    }
    if (s->dirs) cudaFree(s->dirs);
    if (s->adds) cudaFree(s->adds);
    s->dirs = nullptr;
    s->adds = nullptr;
    s->n_embd = n_embd;
    s->n_dirs = n_dirs;
    s->n_adds = static_cast<int>(additions.size());
    if (n_dirs > 0) {
        const size_t bytes = sizeof(float) * static_cast<size_t>(n_dirs) * n_embd;
        std::string err = check(cudaMalloc(&s->dirs, bytes), "cudaMalloc");
        if (!err.empty()) return err;
        err = check(cudaMemcpy(s->dirs, dirs.data(), bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
        if (!err.empty()) return err;
    }
    if (!additions.empty()) {
        const size_t row = sizeof(float) * static_cast<size_t>(n_embd);
        std::string err = check(cudaMalloc(&s->adds, row * additions.size()), "cudaMalloc");
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

std::string apply_inplace(void * state, float * rows, int64_t n_rows, int n_embd, bool ablate, int add_index) {
    auto * s = static_cast<State *>(state);
    if (s->stream == nullptr || n_embd != s->n_embd) return "device state not uploaded (set the plan first)";
    if (add_index >= s->n_adds) return "addition index out of range";
    if (n_rows == 0) return {};
    const float * add = add_index >= 0 ? s->adds + static_cast<size_t>(add_index) * n_embd : nullptr;
    ablate_add_kernel<<<static_cast<unsigned>(n_rows), kThreads, 0, s->stream>>>(rows, n_embd, s->dirs,
                                                                                ablate ? s->n_dirs : 0, add);
    std::string err = check(cudaGetLastError(), "kernel launch");
    if (!err.empty()) return err;
    return check(cudaStreamSynchronize(s->stream), "cudaStreamSynchronize");
}

std::string copy_row_to_host(const float * rows, int64_t row, int n_embd, float * dst) {
    return check(cudaMemcpy(dst, rows + row * n_embd, sizeof(float) * n_embd, cudaMemcpyDeviceToHost), "cudaMemcpy");
}

}  // namespace pyrefusal::cuda
