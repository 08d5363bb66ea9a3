# Shared by the CLI test scripts: `expect NAME CODE PATTERN -- command...` runs the command and
# checks its exit code and (when PATTERN is not empty) that its output matches PATTERN.
failures=0
pass=0

expect() {
  local name=$1 code=$2 pattern=$3
  shift 4
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  if [[ $rc -ne $code ]]; then
    echo "FAIL $name: exit $rc, expected $code. Output:"; echo "$out" | head -5
    failures=$((failures + 1)); return
  fi
  if [[ -n $pattern ]] && ! grep -qE -- "$pattern" <<<"$out"; then
    echo "FAIL $name: output lacks /$pattern/. Output:"; echo "$out" | head -5
    failures=$((failures + 1)); return
  fi
  pass=$((pass + 1))
}
