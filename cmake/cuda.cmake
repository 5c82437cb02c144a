# CUDA part of the build: CUTLASS grouped-GEMM kernels (torch-free .cu files, one kernel
# configuration each, compiled for sm_90a) in a static library, plus the torch glue.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  # -gencode=arch=compute_90a,code=sm_90a: wgmma and the TMA paths need the "a" target.
  set(CMAKE_CUDA_ARCHITECTURES 90a)
endif()
# One CUDA runtime in the process: the shared libcudart that torch also uses (CMake's default
# would add cudart_static beside it).
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
include(cmake/cutlass.cmake)

# torch's CUDA headers include cuBLAS/cuSPARSE headers, which pip's torch keeps in nvidia/cu13.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; p = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', 'cu13', 'include'); print(p if os.path.isdir(p) else '')"
  OUTPUT_VARIABLE TORCH_NVIDIA_INCLUDE OUTPUT_STRIP_TRAILING_WHITESPACE)

file(GLOB ALTO_CUDA_KERNELS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu)
add_library(alto_cuda_kernels STATIC ${ALTO_CUDA_KERNELS})
target_include_directories(alto_cuda_kernels PRIVATE ${CUTLASS_INCLUDE_DIRS} csrc)
target_compile_options(alto_cuda_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -DNDEBUG>)
set_target_properties(alto_cuda_kernels PROPERTIES CUDA_STANDARD 17 CUDA_SEPARABLE_COMPILATION OFF
                                                   POSITION_INDEPENDENT_CODE ON)
target_link_libraries(alto_cuda_kernels PUBLIC CUDA::cudart)

list(APPEND ALTO_SOURCES csrc/cuda/lora_ops_torch.cpp csrc/cuda/packed_adamw_torch.cpp csrc/cuda/device_errors.cpp)
foreach(_lib c10_cuda torch_cuda)
  find_library(TORCH_LIB_${_lib} ${_lib} PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
  list(APPEND TORCH_CORE_LIBRARIES ${TORCH_LIB_${_lib}})
endforeach()
list(APPEND TORCH_INCLUDE_DIRS ${CUDAToolkit_INCLUDE_DIRS} ${TORCH_NVIDIA_INCLUDE})
