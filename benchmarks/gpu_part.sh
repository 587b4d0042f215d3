# Sourced by benchmarks/gpu.sh and gpu_llama8b.sh, which set $work.
part() {  # part NAME SECONDS COMMAND...: run one benchmark with a time limit, its output in $work/parts/NAME.txt
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds} s)"
  timeout "$seconds" "$@" >"$work/parts/$name.txt" 2>"$work/parts/$name.err"
  echo "$?" >"$work/parts/$name.rc"
  tail -n 30 "$work/parts/$name.txt"
}
