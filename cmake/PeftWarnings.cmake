# peft_project_target(<target>): warnings (errors with PEFT_WERROR) and sanitizers for the project's
# own targets. Never applied to the INTERFACE target peft::peft: consumers choose their own flags.
function(peft_project_target target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
  if(PEFT_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  if(PEFT_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined -fno-sanitize-recover=all
                                             -fno-omit-frame-pointer)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined)
  endif()
endfunction()
