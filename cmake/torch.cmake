# Locates the torch the extension will run against (the one of the Python interpreter doing the
# build), without find_package(Torch): we need headers and the core libraries, no pybind11.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; from torch.utils import cpp_extension as c; print('|'.join(c.include_paths()), os.path.join(os.path.dirname(torch.__file__), 'lib'), int(torch._C._GLIBCXX_USE_CXX11_ABI), torch.version.cuda or 'none', torch.__version__, sep='\\n')"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "ALTO needs torch installed in the build's Python (${Python_EXECUTABLE}); "
                      "install it first and build with --no-build-isolation")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 _torch_includes)
string(REPLACE "|" ";" TORCH_INCLUDE_DIRS "${_torch_includes}")
list(GET _torch_info 1 TORCH_LIB_DIR)
list(GET _torch_info 2 TORCH_CXX11_ABI)
list(GET _torch_info 3 TORCH_CUDA_VERSION)
list(GET _torch_info 4 TORCH_VERSION)
message(STATUS "torch ${TORCH_VERSION} (CUDA ${TORCH_CUDA_VERSION}) at ${TORCH_LIB_DIR}")

foreach(_lib c10 torch_cpu torch)
  find_library(TORCH_LIB_${_lib} ${_lib} PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
  list(APPEND TORCH_CORE_LIBRARIES ${TORCH_LIB_${_lib}})
endforeach()
