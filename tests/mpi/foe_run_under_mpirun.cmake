# foe_run under mpirun gives the generation of the one-process run, for an FoE model (groups on
# ranks) and a standard MoE (expert parallelism); foe_comm reports as JSON (on 2 nodes of 2 ranks),
# its measured dispatch bytes equal to what the routing implies (it fails otherwise). Arguments: FOE_RUN,
# FOE_COMM, MPIEXEC, WORK_DIR.
function(run out)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE stdout ERROR_VARIABLE stderr)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${stdout}\n${stderr}")
  endif()
  set(${out} "${stdout}" PARENT_SCOPE)
endfunction()

set(mpi ${MPIEXEC} -n 4 --allow-run-as-root --oversubscribe)
file(REMOVE_RECURSE "${WORK_DIR}")
foreach(name foe-tiny moe-tiny)
  run(ignored ${FOE_RUN} --init ${name} --out ${WORK_DIR}/${name} --seed 5)
  set(args --model ${WORK_DIR}/${name} --tokens 3,1,4,1,5,9 --max-new-tokens 6)
  run(alone ${FOE_RUN} ${args})
  run(spread ${mpi} ${FOE_RUN} ${args})
  if(NOT alone STREQUAL spread)
    message(FATAL_ERROR "${name}: one process printed\n${alone}but 4 ranks printed\n${spread}")
  endif()
  message(STATUS "${name}: ${spread}")
endforeach()

if(FOE_COMM)
  run(report ${mpi} ${FOE_COMM} --config foe-tiny --tokens 64 --ranks-per-node 2 --json)
  string(JSON architectures LENGTH "${report}" architectures)
  if(NOT architectures EQUAL 6)
    message(FATAL_ERROR "foe_comm --json reported ${architectures} architectures:\n${report}")
  endif()
endif()
