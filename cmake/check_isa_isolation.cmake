# Fails the build when a kernel object compiled for a higher instruction-set level
# defines a weak (linker-merged) symbol outside its own namespace: the linker could
# then hand that copy to code running on a CPU without the level (an illegal
# instruction).  Called after linking with NM, LEVEL and OBJECTS set.
foreach(obj IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} -C --defined-only ${obj} OUTPUT_VARIABLE syms RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "vigrad: ${NM} failed on ${obj}")
  endif()
  string(REPLACE "\n" ";" lines "${syms}")
  set(bad "")
  foreach(line IN LISTS lines)
    # nm types: W/V weak, u unique global (both merged across objects by the linker)
    if(line MATCHES "^[0-9a-fA-F]* [WVu] (.*)$")
      set(name "${CMAKE_MATCH_1}")
      string(FIND "${name}" "vigrad::core::${LEVEL}::" pos)
      # clang's exception-handling helpers: a pointer to the personality routine and a
      # two-call stub (__cxa_begin_catch, std::terminate), with no vector instructions
      if(name STREQUAL "DW.ref.__gxx_personality_v0" OR name STREQUAL "__clang_call_terminate")
        continue()
      endif()
      if(pos EQUAL -1)
        string(APPEND bad "\n  ${name}")
      endif()
    endif()
  endforeach()
  if(NOT bad STREQUAL "")
    message(FATAL_ERROR "vigrad: the ${LEVEL} kernels define shared weak symbols outside namespace "
                        "vigrad::core::${LEVEL} (an older CPU could run their ${LEVEL} copy):${bad}")
  endif()
endforeach()
message(STATUS "vigrad: ${LEVEL} kernels isolated (no shared weak symbols)")
