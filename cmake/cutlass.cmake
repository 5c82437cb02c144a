# CUTLASS headers: $CUTLASS_DIR (a CUTLASS checkout or install), else the nvidia-cutlass wheel
# (pip install --no-deps nvidia-cutlass), whose headers sit under cutlass_library/source.
if(DEFINED ENV{CUTLASS_DIR})
  set(_cutlass_root "$ENV{CUTLASS_DIR}")
else()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import os, cutlass_library; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))"
    OUTPUT_VARIABLE _cutlass_root OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _cutlass_rc)
  if(NOT _cutlass_rc EQUAL 0)
    message(FATAL_ERROR "CUDA build needs CUTLASS headers: pip install --no-deps nvidia-cutlass, "
                        "or set CUTLASS_DIR, or build CPU-only with ALTO_CUDA=0")
  endif()
endif()
set(CUTLASS_INCLUDE_DIRS "${_cutlass_root}/include" "${_cutlass_root}/tools/util/include")
if(NOT EXISTS "${_cutlass_root}/include/cutlass/cutlass.h")
  message(FATAL_ERROR "no cutlass/cutlass.h under ${_cutlass_root}/include (CUTLASS_DIR?)")
endif()
message(STATUS "CUTLASS headers: ${_cutlass_root}/include")
