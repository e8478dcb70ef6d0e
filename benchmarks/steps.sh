# Sourced by the GPU check scripts: `step NAME CMD...` runs CMD with its output in
# $OUT_DIR/NAME.log, prints its exit status, seconds and last $TAIL lines, and sets status=1
# when it fails (the scripts exit with $status, so one failed step does not stop the others).
status=0

step() {
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  echo "== $name: $*"
  "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "== $name: rc $rc, $(($(date +%s) - t0)) s"
  tail -n "${TAIL:-12}" "$OUT_DIR/$name.log"
  [ "$rc" -eq 0 ] || status=1
}
