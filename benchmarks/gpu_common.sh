# Sourced by benchmarks/gpu.sh and gpu_llama8b.sh from the repository root, with their arguments: the output
# folder ($out: $OUT or runs/gpu), a scratch folder removed at exit ($work, whose parts/ holds each part's
# output: the device tool returns at most 8 files of $out), $python, $quick (the --quick argument) and `part`.
out=${OUT:-runs/gpu}
work=$(mktemp -d)
mkdir -p "$out" "$work/parts"
trap 'rm -rf "$work"' EXIT
export PYTHONPATH=src:benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
quick=false
[ "${1:-}" = "--quick" ] && quick=true

part() {  # part NAME SECONDS COMMAND...: run one benchmark with a time limit, its output in $work/parts/NAME.txt
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds} s)"
  timeout "$seconds" "$@" >"$work/parts/$name.txt" 2>"$work/parts/$name.err"
  echo "$?" >"$work/parts/$name.rc"
  tail -n 30 "$work/parts/$name.txt"
}
