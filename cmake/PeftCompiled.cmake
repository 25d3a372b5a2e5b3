# peft::compiled, the optional compiled part: the kernels, adapters and optimizers for float and double
# (both storage orders) instantiated once, in a static library. Linking it defines PEFT_COMPILED, which
# turns on the headers' extern template declarations: a translation unit then instantiates none of
# them. src/instantiate.inc is compiled once per scalar type and part, so that the parts build in
# parallel (the longest first).
set(_peft_compiled_sources "")
foreach(_part 1 5 3 4 2)
  foreach(_scalar float double)
    set(_src "${CMAKE_CURRENT_BINARY_DIR}/peft_compiled/part${_part}_${_scalar}.cpp")
    file(CONFIGURE OUTPUT "${_src}" CONTENT
         "#define PEFT_COMPILED_SCALAR ${_scalar}\n#define PEFT_COMPILED_PART ${_part}\n#include \"${CMAKE_CURRENT_SOURCE_DIR}/src/instantiate.inc\"\n")
    list(APPEND _peft_compiled_sources "${_src}")
  endforeach()
endforeach()

add_library(peft_compiled STATIC ${_peft_compiled_sources})
add_library(peft::compiled ALIAS peft_compiled)
target_link_libraries(peft_compiled PUBLIC peft::peft)
target_compile_definitions(peft_compiled PUBLIC PEFT_COMPILED)
set_target_properties(peft_compiled PROPERTIES EXPORT_NAME compiled POSITION_INDEPENDENT_CODE ON)
if(NOT PROJECT_IS_TOP_LEVEL)
  # Vendored: built only if the consuming project links it.
  set_target_properties(peft_compiled PROPERTIES EXCLUDE_FROM_ALL ON)
endif()
