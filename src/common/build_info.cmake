# Run at build time (not configure time) so the embedded git sha follows every commit.
# Inputs: SOURCE_DIR, OUTPUT.
set(sha "unknown")
find_program(GIT git)
if(GIT)
  execute_process(COMMAND ${GIT} rev-parse HEAD WORKING_DIRECTORY ${SOURCE_DIR}
    OUTPUT_VARIABLE sha OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE rc)
  if(rc EQUAL 0)
    execute_process(COMMAND ${GIT} status --porcelain --untracked-files=no WORKING_DIRECTORY ${SOURCE_DIR}
      OUTPUT_VARIABLE dirty OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(dirty)
      set(sha "${sha}-dirty")
    endif()
  else()
    set(sha "unknown")
  endif()
endif()
set(content "// Generated at build time by build_info.cmake.\nnamespace hysparse::build { extern const char* const kGitSha; const char* const kGitSha = \"${sha}\"; }\n")
if(EXISTS ${OUTPUT})
  file(READ ${OUTPUT} old)
endif()
if(NOT "${old}" STREQUAL "${content}")
  file(WRITE ${OUTPUT} "${content}")
endif()
