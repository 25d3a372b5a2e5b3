# Compiles the consumer with nothing but the compiler and two -I flags, then runs it.
get_filename_component(_dir "${OUT}" DIRECTORY)
file(MAKE_DIRECTORY "${_dir}")
execute_process(COMMAND "${CXX}" -std=c++17 -O2 -Wall -Wextra -Wpedantic -Werror
                        -I "${PEFT_INCLUDE}" -I "${EIGEN_INCLUDE}" "${SOURCE}" -o "${OUT}"
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "compiling with -I include failed (${rc})")
endif()
execute_process(COMMAND "${OUT}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the consumer built with -I include failed (${rc})")
endif()
