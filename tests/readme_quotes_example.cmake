# Fails unless README contains EXAMPLE's text verbatim, so the documented example is the one
# that is compiled and run.
file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
string(FIND "${readme}" "${example}" where)
if(where EQUAL -1)
  message(FATAL_ERROR "README.md does not quote ${EXAMPLE} verbatim: update the README's example")
endif()
