# The headers' layering, checked by CTest (test headers.layering): run as
#   cmake -DPEFT_INCLUDE=<repo>/include -P tests/layering.cmake
# Each directory of include/peft may include peft headers only from the directories listed for it, so
# that a lower layer never depends on a higher one: core/ (types, errors, the adapters' bases) uses only
# core/ and the implementation in detail/; detail/ uses core/ and detail/; the adapters build on those
# and linalg/; the optimizers on core/ alone; models on adapters and optimizers; the file formats and MPI
# on everything below them. A header directly under include/peft (the umbrellas, version.hpp) may include
# anything.
cmake_policy(SET CMP0057 NEW)  # if(IN_LIST)
set(_allowed_core     core detail)
set(_allowed_detail   core detail)
set(_allowed_linalg   core detail linalg)
set(_allowed_adapters core detail linalg adapters)
set(_allowed_optim    core detail optim)
set(_allowed_testing  core detail testing)
set(_allowed_model    core detail linalg adapters optim model)
set(_allowed_distributed core detail optim distributed)
set(_allowed_io       core detail linalg adapters optim model io)

file(GLOB_RECURSE _headers RELATIVE "${PEFT_INCLUDE}/peft" "${PEFT_INCLUDE}/peft/*.hpp")
set(_violations "")
foreach(_header IN LISTS _headers)
  string(FIND "${_header}" "/" _slash)
  if(_slash EQUAL -1)
    continue()  # an umbrella header
  endif()
  string(SUBSTRING "${_header}" 0 ${_slash} _layer)
  if(NOT DEFINED _allowed_${_layer})
    string(APPEND _violations "  ${_header}: the directory ${_layer}/ has no layer (add it to tests/layering.cmake)\n")
    continue()
  endif()
  file(STRINGS "${PEFT_INCLUDE}/peft/${_header}" _includes REGEX "^[ \t]*#[ \t]*include[ \t]*[<\"]peft/")
  foreach(_line IN LISTS _includes)
    string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*[<\"]peft/([^>\"]*)[>\"].*$" "\\1" _target "${_line}")
    string(FIND "${_target}" "/" _target_slash)
    if(_target_slash EQUAL -1)
      string(APPEND _violations "  ${_header} includes peft/${_target}, an umbrella header\n")
      continue()
    endif()
    string(SUBSTRING "${_target}" 0 ${_target_slash} _target_layer)
    if(NOT _target_layer IN_LIST _allowed_${_layer})
      string(APPEND _violations "  ${_header} includes peft/${_target}: ${_layer}/ may include only ${_allowed_${_layer}}\n")
    endif()
  endforeach()
endforeach()
if(_violations)
  message(FATAL_ERROR "peft: headers that include a higher layer:\n${_violations}")
endif()
list(LENGTH _headers _count)
message(STATUS "peft: the ${_count} headers keep their layers")
