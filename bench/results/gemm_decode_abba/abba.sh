#!/bin/bash
# ABBA per benchmark, waiting for an idle machine before each run. $1 = threads, rest = exact filters
thr=$1; shift
busy() { # percent of CPU used by others over 1 s
  read -r _ u1 n1 s1 i1 w1 q1 sq1 st1 _ < /proc/stat; sleep 1; read -r _ u2 n2 s2 i2 w2 q2 sq2 st2 _ < /proc/stat
  t=$(( (u2+n2+s2+i2+w2+q2+sq2+st2) - (u1+n1+s1+i1+w1+q1+sq1+st1) )); b=$(( (u2+n2+s2+q2+sq2+st2) - (u1+n1+s1+q1+sq1+st1) ))
  echo $(( 100 * b / t ))
}
waitidle() { for i in $(seq 1 600); do [ "$(busy)" -lt 10 ] && return 0; done; echo "never idle" >&2; }
ARGS="--benchmark_min_time=0.5 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true --benchmark_format=json"
for f in "$@"; do
  for w in before after after before; do
    waitidle
    OMP_NUM_THREADS=$thr /tmp/bench_kernels_$w --benchmark_filter="$f" $ARGS 2>/dev/null > /tmp/bench/abba_${thr}_${w}_$(echo "$f" | tr -c 'A-Za-z0-9' '_')_$RANDOM.json
    echo "$(date +%T) done $w $f" >&2
  done
done
