# The API reference: `cmake --build <dir> --target docs` runs Doxygen over the public headers
# (include/peft, without include/peft/detail), warnings as errors, into <dir>/docs/api/html. With
# PEFT_BUILD_DOCS (the ci preset) it is part of the default target, so CI builds it.
set(PEFT_DOCS_OUTPUT "${PROJECT_BINARY_DIR}/docs/api")
configure_file("${PROJECT_SOURCE_DIR}/cmake/Doxyfile.in" "${PROJECT_BINARY_DIR}/Doxyfile" @ONLY)
file(GLOB_RECURSE _peft_public_headers CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/include/peft/*.hpp")
add_custom_command(OUTPUT "${PEFT_DOCS_OUTPUT}/html/index.html"
                   COMMAND ${CMAKE_COMMAND} -E make_directory "${PEFT_DOCS_OUTPUT}"
                   COMMAND Doxygen::doxygen "${PROJECT_BINARY_DIR}/Doxyfile"
                   DEPENDS ${_peft_public_headers} "${PROJECT_BINARY_DIR}/Doxyfile"
                           "${PROJECT_SOURCE_DIR}/docs/api_mainpage.md"
                   COMMENT "peft: the API reference (Doxygen, warnings as errors)")
if(PEFT_BUILD_DOCS)
  add_custom_target(docs ALL DEPENDS "${PEFT_DOCS_OUTPUT}/html/index.html")
else()
  add_custom_target(docs DEPENDS "${PEFT_DOCS_OUTPUT}/html/index.html")
endif()
