# Configures, builds and runs tests/consumer against foe, as a user's project would.
#   MODE=subdirectory: the consumer add_subdirectory()s foe's source tree.
#   MODE=package:      foe's build tree is installed to a prefix; the consumer find_package()s it.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
set(args -S "${FOE_SOURCE_DIR}/tests/consumer" -B "${WORK_DIR}/build" -G "${GENERATOR}"
         -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DFOE_MODE=${MODE})
if(MODE STREQUAL "subdirectory")
  list(APPEND args -DFOE_SOURCE_DIR=${FOE_SOURCE_DIR})
else()
  run(${CMAKE_COMMAND} --install "${FOE_BINARY_DIR}" --prefix "${WORK_DIR}/prefix")
  list(APPEND args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
endif()
run(${CMAKE_COMMAND} ${args})
run(${CMAKE_COMMAND} --build "${WORK_DIR}/build")
run("${WORK_DIR}/build/consumer")
message(STATUS "consumer via ${MODE}: built and ran")
