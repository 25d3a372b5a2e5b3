# peft::compiled, the optional compiled part: the kernels, adapters and optimizers for float and double
# (both storage orders) instantiated once, in a static library. Linking it defines PEFT_COMPILED, which
# turns on the headers' extern template declarations: a translation unit then instantiates none of
# them. src/instantiate.inc is compiled once per scalar type and part, so that the parts build in
# parallel (the longest first).
set(_peft_compiled_sources "")
foreach(_part 5 4 3 1 2)  # the longest first (the SVDs take three times any other part)
  foreach(_scalar float double)
    set(_src "${CMAKE_CURRENT_BINARY_DIR}/peft_compiled/part${_part}_${_scalar}.cpp")
    file(CONFIGURE OUTPUT "${_src}" CONTENT
         "#define PEFT_COMPILED_SCALAR ${_scalar}\n#define PEFT_COMPILED_PART ${_part}\n#include \"${CMAKE_CURRENT_SOURCE_DIR}/src/instantiate.inc\"\n")
    list(APPEND _peft_compiled_sources "${_src}")
  endforeach()
endforeach()

# What a translation unit that links the compiled part must share with it: Eigen's version, and Eigen's
# largest alignment, which the vectorization flags (-mavx, -march=...) set and which decides how every
# matrix's memory is allocated and freed. Both become compile definitions of the target, and
# core/types.hpp stops a translation unit that differs with an #error naming the difference.
include(CheckCXXSourceCompiles)
set(_peft_saved_config "${CMAKE_TRY_COMPILE_CONFIGURATION}")
set(CMAKE_TRY_COMPILE_CONFIGURATION "${CMAKE_BUILD_TYPE}")
set(CMAKE_REQUIRED_LIBRARIES Eigen3::Eigen)
set(CMAKE_REQUIRED_QUIET ON)
set(_peft_eigen_align "")
foreach(_align 16 32 64 0 8)
  unset(PEFT_EIGEN_MAX_ALIGN_IS_${_align} CACHE)  # asked again at each configure: the flags may have changed
  check_cxx_source_compiles("#include <Eigen/Core>
static_assert(EIGEN_MAX_ALIGN_BYTES == ${_align}, \"\");
int main() { return 0; }" PEFT_EIGEN_MAX_ALIGN_IS_${_align})
  if(PEFT_EIGEN_MAX_ALIGN_IS_${_align})
    set(_peft_eigen_align ${_align})
    break()
  endif()
endforeach()
unset(CMAKE_REQUIRED_LIBRARIES)
unset(CMAKE_REQUIRED_QUIET)
set(CMAKE_TRY_COMPILE_CONFIGURATION "${_peft_saved_config}")
if(_peft_eigen_align STREQUAL "")
  message(FATAL_ERROR "peft: could not tell Eigen's EIGEN_MAX_ALIGN_BYTES for peft::compiled")
endif()
string(REGEX MATCH "^([0-9]+)\\.([0-9]+)\\.([0-9]+)" _peft_v "${Eigen3_VERSION}")
math(EXPR _peft_eigen_version "${CMAKE_MATCH_1} * 10000 + ${CMAKE_MATCH_2} * 100 + ${CMAKE_MATCH_3}")
set(PEFT_COMPILED_EIGEN_MAX_ALIGN_BYTES ${_peft_eigen_align})

add_library(peft_compiled STATIC ${_peft_compiled_sources})
add_library(peft::compiled ALIAS peft_compiled)
target_link_libraries(peft_compiled PUBLIC peft::peft)
target_compile_definitions(peft_compiled PUBLIC PEFT_COMPILED
                                                  PEFT_COMPILED_EIGEN_MAX_ALIGN_BYTES=${_peft_eigen_align}
                                                  PEFT_COMPILED_EIGEN_VERSION=${_peft_eigen_version}
                                                  PEFT_COMPILED_BLAS=$<BOOL:${PEFT_HAS_BLAS}>)
set_target_properties(peft_compiled PROPERTIES EXPORT_NAME compiled POSITION_INDEPENDENT_CODE ON)
if(NOT PROJECT_IS_TOP_LEVEL)
  # Vendored: built only if the consuming project links it.
  set_target_properties(peft_compiled PROPERTIES EXCLUDE_FROM_ALL ON)
endif()
