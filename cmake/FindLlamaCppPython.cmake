# FindLlamaCppPython.cmake
#
# Locate the llama.cpp / ggml that the installed llama-cpp-python ships, so that
# pyrefusal._core links against the very libraries llama_cpp loads at run time (one copy of
# ggml in the process, never two).
#
# Inputs (optional cache variables):
#   LLAMA_CPP_PYTHON_DIR   the `llama_cpp` package directory (default: asked from Python)
#   LLAMA_CPP_INCLUDE_DIR  directory holding ggml.h, ggml-backend.h, llama.h
#                          (default: <site-packages>/include, where llama-cpp-python installs them)
# Outputs:
#   LlamaCppPython_FOUND, LlamaCppPython_VERSION, LLAMA_CPP_LIB_DIR, LLAMA_CPP_INCLUDE_DIR,
#   imported target LlamaCppPython::ggml_base

set(_pyrefusal_fix "Install the pinned runtime first, e.g. `pip install llama-cpp-python==${PYREFUSAL_LLAMA_CPP_PYTHON_PIN}`, then build pyrefusal in the same environment (`pip install --no-build-isolation .`, or plain `pip install .`, which installs it into the build environment). You can also point -DLLAMA_CPP_PYTHON_DIR=<.../site-packages/llama_cpp> and -DLLAMA_CPP_INCLUDE_DIR=<dir with ggml.h> at an existing installation.")

if(NOT LLAMA_CPP_PYTHON_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util, pathlib; s = importlib.util.find_spec('llama_cpp'); print(pathlib.Path(s.origin).parent if s and s.origin else '')"
    OUTPUT_VARIABLE LLAMA_CPP_PYTHON_DIR
    OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _res)
endif()
if(NOT LLAMA_CPP_PYTHON_DIR OR NOT EXISTS "${LLAMA_CPP_PYTHON_DIR}/__init__.py")
  message(FATAL_ERROR "pyrefusal: llama-cpp-python is not importable from ${Python_EXECUTABLE}. ${_pyrefusal_fix}")
endif()

file(STRINGS "${LLAMA_CPP_PYTHON_DIR}/__init__.py" _ver_line REGEX "^__version__ *= *\"[^\"]+\"")
string(REGEX REPLACE "^__version__ *= *\"([^\"]+)\".*" "\\1" LlamaCppPython_VERSION "${_ver_line}")

set(LLAMA_CPP_LIB_DIR "${LLAMA_CPP_PYTHON_DIR}/lib")
if(NOT LLAMA_CPP_INCLUDE_DIR)
  get_filename_component(_site "${LLAMA_CPP_PYTHON_DIR}" DIRECTORY)
  set(LLAMA_CPP_INCLUDE_DIR "${_site}/include")
endif()

foreach(_h ggml.h ggml-backend.h llama.h)
  if(NOT EXISTS "${LLAMA_CPP_INCLUDE_DIR}/${_h}")
    message(FATAL_ERROR "pyrefusal: header ${_h} not found in ${LLAMA_CPP_INCLUDE_DIR} (llama-cpp-python ${LlamaCppPython_VERSION} at ${LLAMA_CPP_PYTHON_DIR}). ${_pyrefusal_fix}")
  endif()
endforeach()

find_library(LLAMA_CPP_GGML_BASE NAMES ggml-base PATHS "${LLAMA_CPP_LIB_DIR}" NO_DEFAULT_PATH)
if(NOT LLAMA_CPP_GGML_BASE)
  message(FATAL_ERROR "pyrefusal: libggml-base not found in ${LLAMA_CPP_LIB_DIR}. ${_pyrefusal_fix}")
endif()

add_library(LlamaCppPython::ggml_base SHARED IMPORTED)
set_target_properties(LlamaCppPython::ggml_base PROPERTIES
  IMPORTED_LOCATION "${LLAMA_CPP_GGML_BASE}"
  INTERFACE_INCLUDE_DIRECTORIES "${LLAMA_CPP_INCLUDE_DIR}")
set(LlamaCppPython_FOUND TRUE)
message(STATUS "pyrefusal: llama-cpp-python ${LlamaCppPython_VERSION} at ${LLAMA_CPP_PYTHON_DIR}")
