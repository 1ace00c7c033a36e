// pyrefusal/csrc/bindings.cpp
//
// pybind11 module `pyrefusal._core`: the only file that includes pybind11. It exposes the
// Hook (hook.h) with NumPy in/out and the address of the C callback, which Python puts
// into `llama_context_params.cb_eval` together with `Hook.user_data` as
// `cb_eval_user_data`. Docstrings here are mirrored in pyrefusal/_core.pyi.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ggml.h"
#include "hook.h"

namespace py = pybind11;
using pyrefusal::Hook;
using pyrefusal::NodeOps;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

void set_directions(Hook & h, const FloatArray & dirs) {
    if (dirs.ndim() != 2 || dirs.shape(1) != h.n_embd()) {
        throw std::invalid_argument("directions must have shape (k, n_embd=" + std::to_string(h.n_embd()) +
                                    "); got a different shape - check the direction belongs to this model");
    }
    h.set_directions(dirs.data(), static_cast<int>(dirs.shape(0)));
}

int add_vector(Hook & h, const FloatArray & v) {
    if (v.ndim() != 1 || v.shape(0) != h.n_embd()) {
        throw std::invalid_argument("addition vector must have shape (n_embd=" + std::to_string(h.n_embd()) +
                                    ",); check the vector belongs to this model");
    }
    return h.add_vector(v.data());
}

void set_plan(Hook & h, const py::dict & plan) {
    std::unordered_map<std::string, NodeOps> out;
    for (auto item : plan) {
        const auto name = item.first.cast<std::string>();
        const auto ops = item.second.cast<py::tuple>();
        if (ops.size() != 3) throw std::invalid_argument("plan values must be (ablate, add_index, capture_layer)");
        NodeOps n;
        n.ablate = ops[0].cast<bool>();
        n.add_index = ops[1].cast<int>();
        n.capture_layer = ops[2].cast<int>();
        out.emplace(name, n);
    }
    h.set_plan(out);
}

py::array_t<float> captured(const Hook & h) {
    const auto & buf = h.capture_buffer();
    py::array_t<float> arr({static_cast<py::ssize_t>(h.capture_slots()), static_cast<py::ssize_t>(h.capture_layers()),
                            static_cast<py::ssize_t>(h.n_embd())});
    std::memcpy(arr.mutable_data(), buf.data(), buf.size() * sizeof(float));
    return arr;
}

py::dict stats(const Hook & h) {
    const auto & s = h.stats();
    py::dict d;
    d["asked"] = s.asked;
    d["observed"] = s.observed;
    d["rows_ablated"] = s.rows_ablated;
    d["rows_added"] = s.rows_added;
    d["rows_captured"] = s.rows_captured;
    d["device_nodes"] = s.device_nodes;
    d["cuda_kernel_nodes"] = s.cuda_kernel_nodes;
    d["data_ns"] = s.data_ns;
    return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "pyrefusal's in-graph residual-stream hook for llama.cpp (capture, ablation, addition).";

    py::class_<Hook>(m, "Hook")
        .def(py::init<int>(), py::arg("n_embd"), "Create a hook for a model of width n_embd.")
        .def_property_readonly("n_embd", &Hook::n_embd)
        .def_property_readonly("n_directions", &Hook::n_directions)
        .def("set_directions", &set_directions, py::arg("directions"),
             "Set orthonormal ablation directions, float32 (k, n_embd); k=0 clears.")
        .def("add_vector", &add_vector, py::arg("vector"),
             "Register an addition vector (n_embd,), already scaled; returns its index.")
        .def("set_plan", &set_plan, py::arg("plan"),
             "Replace the node plan: {node_name: (ablate: bool, add_index: int, capture_layer: int)}.")
        .def("clear", &Hook::clear, "Drop plan, directions and addition vectors.")
        .def("set_capture_buffer", &Hook::set_capture_buffer, py::arg("n_slots"), py::arg("n_layers"),
             "Allocate a zeroed capture buffer of shape (n_slots, n_layers, n_embd).")
        .def("set_capture_rows", &Hook::set_capture_rows, py::arg("full"), py::arg("out"),
             "Row->slot maps for the next decode: `full` for batch-sized tensors, `out` for output-pruned ones.")
        .def("captured", &captured, "Copy of the capture buffer, float32 (n_slots, n_layers, n_embd).")
        .def("set_record_names", &Hook::set_record_names, py::arg("on"),
             "Record the name of every node the scheduler asks about.")
        .def("recorded_names", &Hook::recorded_names, "Names recorded since set_record_names(True).")
        .def("take_error", &Hook::take_error, "Return and clear the error recorded inside the callback ('' if none).")
        .def("stats", &stats, "Counters since the last reset_stats().")
        .def("reset_stats", &Hook::reset_stats)
        .def_property_readonly(
            "user_data", [](Hook & h) { return reinterpret_cast<std::uintptr_t>(&h); },
            "Address to pass as llama_context_params.cb_eval_user_data.");

    m.def(
        "callback_address", []() { return reinterpret_cast<std::uintptr_t>(&Hook::callback); },
        "Address of the C eval callback, for llama_context_params.cb_eval.");
    m.def("cuda_compiled", &Hook::cuda_compiled, "Whether this build contains the CUDA in-place kernel.");
    m.def(
        "build_info",
        []() {
            py::dict d;
            d["cuda_kernel"] = Hook::cuda_compiled();
            d["ggml_version"] = std::string(ggml_version());
            d["ggml_commit"] = std::string(ggml_commit());
#ifdef PYREFUSAL_LLAMA_CPP_PYTHON_VERSION
            d["built_against_llama_cpp_python"] = std::string(PYREFUSAL_LLAMA_CPP_PYTHON_VERSION);
#endif
            return d;
        },
        "Build facts: CUDA kernel compiled, ggml version/commit of the linked library.");
}
