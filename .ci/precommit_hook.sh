#!/usr/bin/env bash
# Use the `quantgate` hook of .pre-commit-hooks.yaml exactly as another repository would: pre-commit builds the
# hook's own environment (language: python, `pip install` of this repository, which brings the plain onnxruntime
# wheel from the package index) and runs `quantgate pre-commit` on a consumer repository holding a copy of the
# bundled registry. Needs the network (the package index); the pytest suite covers the same hook offline.
#
#   .ci/precommit_hook.sh        (uses `pre-commit` from PATH, or $PRE_COMMIT)
#
# Checks: nothing gated changed -> passes without running a model; all bundled entries -> pass; a sidecar whose
# bytes changed (corrupted) -> the commit is refused with the gate's message.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pc="${PRE_COMMIT:-pre-commit}"
work="$(mktemp -d "${TMPDIR:-/tmp}/quantgate-hook.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export PRE_COMMIT_HOME="$work/home"  # a fresh hook environment, built from the package index
fail() { echo "precommit_hook: FAIL: $*" >&2; exit 1; }
start=$(date +%s)

consumer="$work/consumer"
mkdir -p "$consumer"
cp -r "$root/model" "$root/fixtures" "$consumer/"
echo "consumer" > "$consumer/README.md"
git -C "$consumer" init -q -b main
git -C "$consumer" add -A
git -C "$consumer" -c user.name=ci -c user.email=ci@example.com commit -q -m initial

run_hook() {  # run_hook <log> <pre-commit try-repo args...>
  local log="$1"; shift
  local rc=0
  (cd "$consumer" && "$pc" try-repo "$root" quantgate --verbose "$@") >"$log" 2>&1 || rc=$?
  return "$rc"
}

echo "== precommit_hook: build the hook environment and gate a file no entry uses" >&2
run_hook "$work/noop.log" --files README.md || { cat "$work/noop.log" >&2; fail "no-op run failed"; }
grep -q "(no files to check)Skipped" "$work/noop.log" || { cat "$work/noop.log" >&2; fail "the hook ran on README.md"; }

echo "== precommit_hook: every bundled entry" >&2
run_hook "$work/all.log" --all-files || { cat "$work/all.log" >&2; fail "the bundled registry did not pass"; }
grep -E "passed, 0 failed, 0 errors" "$work/all.log" >&2 || { cat "$work/all.log" >&2; fail "no gate summary"; }

echo "== precommit_hook: a corrupted sidecar is refused" >&2
sidecar="$(cd "$consumer" && ls model/*.int8.onnx | head -n 1)"
printf '\0' >> "$consumer/$sidecar"
rc=0; run_hook "$work/bad.log" --files "$sidecar" || rc=$?
[[ "$rc" != 0 ]] || { cat "$work/bad.log" >&2; fail "the hook accepted a changed sidecar"; }
grep -q "quantgate ERROR: " "$work/bad.log" || { cat "$work/bad.log" >&2; fail "no gate error message"; }
grep -m1 "quantgate ERROR" "$work/bad.log" | cut -c1-200 >&2
echo "== precommit_hook: OK in $(( $(date +%s) - start )) s" >&2
