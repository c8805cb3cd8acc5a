# foe_run's failures under mpirun end the job on every rank, quickly, saying what went wrong:
# a usage error on one rank, a request that differs between ranks, a rank that hangs (stopped
# with SIGSTOP) while the others wait in a collective, and an overflowing --max-new-tokens.
# Arguments: FOE_RUN, MPIEXEC, WORK_DIR.
set(mpi ${MPIEXEC} --allow-run-as-root --oversubscribe)
file(REMOVE_RECURSE "${WORK_DIR}")
execute_process(COMMAND ${FOE_RUN} --init foe-tiny --out ${WORK_DIR}/m --seed 2 RESULT_VARIABLE rc ERROR_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "foe_run --init failed (${rc})")
endif()
set(model --model ${WORK_DIR}/m)

# Runs the command (at most `limit` seconds: a hang fails the test instead of the ctest timeout),
# requires exit status `want_rc` ("nonzero" for any failure) and `want_text` in its output.
function(expect name want_rc want_text limit)
  string(TIMESTAMP start "%s")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT ${limit})
  string(TIMESTAMP end "%s")
  math(EXPR took "${end} - ${start}")
  set(all "${out}${err}")
  if(rc MATCHES "timeout|Process terminated")
    message(FATAL_ERROR "${name}: still running after ${limit} s (${rc})\n${all}")
  endif()
  if((want_rc STREQUAL "nonzero" AND rc EQUAL 0) OR (NOT want_rc STREQUAL "nonzero" AND NOT rc EQUAL want_rc))
    message(FATAL_ERROR "${name}: exit status ${rc}, expected ${want_rc}\n${all}")
  endif()
  string(FIND "${all}" "${want_text}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "${name}: the output does not say \"${want_text}\":\n${all}")
  endif()
  message(STATUS "${name}: exit ${rc} after ${took} s, says \"${want_text}\"")
endfunction()

# An unknown option on rank 1 only: every rank stops at once, rank 0 names rank 1 and the option.
expect("usage error on one rank" 2 "usage error: rank 1 failed: unknown option --bogus" 30
       ${mpi} -n 1 ${FOE_RUN} ${model} --tokens 1,2 : -n 1 ${FOE_RUN} ${model} --tokens 1,2 --bogus 1)
# Another prompt (one token more: the all-reduce sizes would differ) and --max-new-tokens on rank 1.
expect("different requests" 1 "--tokens differs on rank(s) 1 from rank 0; --max-new-tokens differs on rank(s) 1" 30
       ${mpi} -n 1 ${FOE_RUN} ${model} --tokens 1,2 : -n 1 ${FOE_RUN} ${model} --tokens 1,2,3 --max-new-tokens 5)
# Rank 1 hangs before its first forward: rank 0 times out after 2 s and the job ends.
expect("a hung rank" nonzero "did not complete within 2 s" 60
       ${CMAKE_COMMAND} -E env FOE_RUN_FAULT_STOP_RANK=1
       ${mpi} -n 2 ${FOE_RUN} ${model} --tokens 1,2 --max-new-tokens 4 --comm-timeout 2)
# --max-new-tokens near INT64_MAX: refused, not wrapped around (agreed, so rank 0 reports).
expect("--max-new-tokens INT64_MAX" 1 "exceed max_position_embeddings (64)" 30
       ${mpi} -n 2 ${FOE_RUN} ${model} --tokens 1,2 --max-new-tokens 9223372036854775807)

# 4 ranks on this machine's cores with OMP_NUM_THREADS unset: each rank takes its share of the
# cores. Before, every rank ran as many OpenMP threads as the machine has cores, and 4 ranks on 2
# cores took 41 s for this (0.8 s now; the bound leaves room for sanitizer builds).
execute_process(COMMAND ${FOE_RUN} --init foe-small --out ${WORK_DIR}/small --seed 2 RESULT_VARIABLE rc ERROR_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "foe_run --init foe-small failed (${rc})")
endif()
expect("4 ranks, OMP_NUM_THREADS unset" 0 "\"generated\": [" 25
       ${CMAKE_COMMAND} -E env --unset=OMP_NUM_THREADS
       ${mpi} -n 4 ${FOE_RUN} --model ${WORK_DIR}/small --tokens 1,2,3,4,5,6,7,8 --max-new-tokens 16)
