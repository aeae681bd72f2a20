#!/usr/bin/env bash
# Gate the bundled registry on one execution provider, in a throwaway virtualenv holding exactly ONE onnxruntime
# wheel (onnxruntime, onnxruntime-gpu and onnxruntime-openvino all install the module `onnxruntime`: two in one
# environment break both) and no torch: `pip install -e .[cpu|openvino|gpu]`, the extra that names that wheel.
#
#   .ci/ep_gate.sh cpu|openvino|cuda
#
# cpu       onnxruntime:           pytest --quantgate --quantgate-ep cpu --quantgate-strict-ep model/registry.json
# openvino  onnxruntime-openvino:  pytest --quantgate --quantgate-ep openvino --quantgate-strict-ep ... (must pass)
# cuda      onnxruntime-gpu:       with a usable NVIDIA GPU (nvidia-smi -L lists one), the strict gate must pass.
#           Without one, the gate must refuse to record anything as "cuda": --quantgate-ep cuda must SKIP every cuda
#           item (never pass), and --quantgate-ep cuda --quantgate-strict-ep must ERROR every cuda item.
#           QUANTGATE_CUDA_EXPECT=gpu|nogpu overrides the detection.
#
# Environment:
#   QUANTGATE_EP_VENV   the virtualenv to (re)create (default: .venv-<ep> in the repository root; gitignored)
#   QUANTGATE_EP_KEEP   1 keeps the virtualenv afterwards (default: removed, it is throwaway)
#   QUANTGATE_ORT_SPEC  the onnxruntime requirement installed with the extra, pinning its version (default per EP
#                       below; on a GPU runner without system CUDA use
#                       e.g. 'onnxruntime-gpu[cuda,cudnn]==1.31.1')
#   PYTHON              the interpreter that creates the virtualenv (default: python3)
#   QUANTGATE_EP_REPORT write the passing gate's JSON report there (--quantgate-report), for `quantgate report merge`
# Each step prints its wall time; the script exits non-zero on the first broken expectation.
set -euo pipefail

ep="${1:-}"
case "$ep" in
  cpu)      dist=onnxruntime;          extra=cpu;      default_spec="onnxruntime==1.31.1" ;;
  openvino) dist=onnxruntime-openvino; extra=openvino; default_spec="onnxruntime-openvino==1.24.1" ;;
  cuda)     dist=onnxruntime-gpu;      extra=gpu;      default_spec="onnxruntime-gpu==1.31.1" ;;
  *) echo "usage: $0 cpu|openvino|cuda" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${QUANTGATE_EP_VENV:-$root/.venv-$ep}"
spec="${QUANTGATE_ORT_SPEC:-$default_spec}"
py="${PYTHON:-python3}"
registry="model/registry.json"
report_args=()
if [[ -n "${QUANTGATE_EP_REPORT:-}" ]]; then report_args=("--quantgate-report=$QUANTGATE_EP_REPORT"); fi
work="$(mktemp -d "${TMPDIR:-/tmp}/quantgate-ep-$ep.XXXXXX")"

step_start=0
step() { step_start=$(date +%s.%N); echo "== ep_gate[$ep]: $*" >&2; }
done_step() { awk -v a="$step_start" -v b="$(date +%s.%N)" -v s="$1" 'BEGIN { printf "== ep_gate['"$ep"']: %s took %.1f s\n", s, b - a }' >&2; }
fail() { echo "ep_gate[$ep]: FAIL: $*" >&2; exit 1; }
pip_q() {  # pip install, quiet; its log is shown only when it fails
  "$vpy" -m pip install -q --disable-pip-version-check "$@" >"$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; fail "pip install $*"; }
}

cleanup() {
  rm -rf "$work"
  if [[ "${QUANTGATE_EP_KEEP:-0}" != 1 && -f "$venv/pyvenv.cfg" ]]; then rm -rf "$venv"; fi
}
trap cleanup EXIT

# refuse to wipe something that is not a virtualenv
if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
  fail "$venv exists and is not a virtualenv; set QUANTGATE_EP_VENV to a fresh path"
fi

t0=$(date +%s.%N)
step "create $venv"
rm -rf "$venv"
"$py" -m venv "$venv"
vpy="$venv/bin/python"
done_step "venv"

step "install pytest-quantgate[$extra] with $spec (the extra brings exactly this one onnxruntime wheel)"
pip_q -e ".[$extra]" "$spec"
done_step "package, onnxruntime wheel and core dependencies"

step "check the environment"
ort_dists="$("$vpy" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null \
  | grep -iE '^onnxruntime(-gpu|-openvino|-directml|-training|-qnn)?==' || true)"
echo "$ort_dists" | sed 's/^/   /' >&2
count="$(echo "$ort_dists" | grep -c . || true)"
[[ "$count" == 1 ]] || fail "expected exactly one onnxruntime distribution, found $count: $(echo $ort_dists)"
echo "$ort_dists" | grep -qi "^$dist==" || fail "expected $dist, found $ort_dists"
if "$vpy" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null | grep -qiE '^torch=='; then
  fail "torch was installed into the EP virtualenv"
fi
"$vpy" -c "from pytest_quantgate.engine.ort import check_onnxruntime; check_onnxruntime(); import onnxruntime as o, pytest_quantgate.engine.providers as p; print('   providers:', o.get_available_providers()); print('   gate EPs (auto):', p.available())" >&2
done_step "environment check"

gate() {  # gate <junit.xml> <extra pytest args...>; prints pytest's output, returns its exit code
  local xml="$1"; shift
  local rc=0
  "$vpy" -m pytest -p no:cacheprovider --quantgate --quantgate-ep "$ep" --junitxml "$xml" "$@" "$registry" || rc=$?
  return "$rc"
}

# check_items <junit.xml> <skipped|error|passed>: every <ep> item must have that outcome; there must be at least one
check_items() {
  "$vpy" - "$1" "$2" "$ep" <<'PY'
import sys
import xml.etree.ElementTree as ET

path, want, ep = sys.argv[1:]
names = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
cases = [c for c in ET.parse(path).getroot().iter("testcase") if c.get("name", "").endswith(f"[{ep}]")]
if not cases:
    sys.exit(f"no [{ep}] item was collected from the registry")
bad = []
for case in cases:
    got = "passed"
    for tag in ("skipped", "error", "failure"):
        if case.find(tag) is not None:
            got = tag
            break
    message = next((c.get("message", "") for c in case if c.tag in ("skipped", "error", "failure")), "")
    print(f"   {case.get('name')}: {got.upper()}  {message[:160]}", file=sys.stderr)
    if got != want:
        bad.append(f"{case.get('name')} {got}")
    elif want != "passed" and names[ep] not in message:
        bad.append(f"{case.get('name')} {got} without naming {names[ep]}")
if bad:
    sys.exit(f"expected every [{ep}] item {want}, got: {', '.join(bad)}")
PY
}

case "$ep" in
  cpu|openvino)
    step "pytest --quantgate --quantgate-ep $ep --quantgate-strict-ep $registry (must pass)"
    gate "$work/gate.xml" --quantgate-strict-ep "${report_args[@]}" || fail "the $ep gate did not pass"
    check_items "$work/gate.xml" passed || fail "not every $ep item passed"
    done_step "gate"
    if [[ "$ep" == openvino ]]; then
      step "OpenVINO refusals: graphs it cannot take, a device that is missing (never a silent CPU run)"
      "$vpy" - "$work" <<'PY' || fail "OpenVINO refusal checks"
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pytest_quantgate.errors import EpUnavailableError
from pytest_quantgate.engine.providers import SessionSpec, open_session
from pytest_quantgate.settings import EpOptions

work = Path(sys.argv[1])


def save(name, nodes, x, y, inits=()):
    model = helper.make_model(helper.make_graph(nodes, name, [x], [y], initializer=list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, work / f"{name}.onnx")
    return work / f"{name}.onnx"


def refused(path, options, *expected):
    try:
        open_session(path, SessionSpec("openvino", options))
    except EpUnavailableError as exc:
        text = str(exc)
        missing = [e for e in expected if e not in text]
        print(f"   {path.name} {options.openvino_device}/{options.openvino_precision}: refused: {text[:220]}",
              file=sys.stderr)
        if missing:
            sys.exit(f"{path.name}: message lacks {missing}: {text}")
        return
    sys.exit(f"{path.name}: OpenVINO session opened, expected a refusal naming {expected}")


cpu = EpOptions()
# a node OpenVINO lacks: named, never run on CPU behind OpenVINO's back
det = save("det", [helper.make_node("Relu", ["x"], ["r"], name="relu0"), helper.make_node("Det", ["r"], ["y"], name="det0")],
           helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3]),
           helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]))
refused(det, cpu, "OpenVINO cannot take", "Det (det0)", "CPU fallback is disabled")
# dynamic int8 Conv: onnxruntime-openvino refuses the whole graph, even with CPU fallback allowed
w = numpy_helper.from_array(np.full((4, 1, 3, 3), 130, np.uint8), "w")
wz = numpy_helper.from_array(np.array(128, np.uint8), "wz")
conv = save("convinteger", [
    helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
    helper.make_node("ConvInteger", ["xq", "w", "xz", "wz"], ["ci"], name="conv_quant", pads=[1, 1, 1, 1]),
    helper.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT, name="cast"),
    helper.make_node("Mul", ["cf", "xs"], ["y"], name="mul")],
    helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8]),
    helper.make_tensor_value_info("y", TensorProto.FLOAT, None), [w, wz])
refused(conv, cpu, "ConvInteger (conv_quant)", "even with CPU fallback allowed", "while the CPU EP loads it")
# a precision the device does not accept: OpenVINO's own reason, not ORT's "assigned to the default CPU EP"
refused(det, EpOptions(openvino_precision="FP16"), "CPU only supports FP32, ACCURACY")
PY
      done_step "OpenVINO refusal checks"
    fi
    ;;
  cuda)
    expect="${QUANTGATE_CUDA_EXPECT:-}"
    if [[ -z "$expect" ]]; then
      if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then expect=gpu; else expect=nogpu; fi
    fi
    if [[ "$expect" == gpu ]]; then
      step "GPU found: pytest --quantgate --quantgate-ep cuda --quantgate-strict-ep $registry (must pass)"
      gate "$work/gate.xml" --quantgate-strict-ep "${report_args[@]}" || fail "the cuda gate did not pass"
      check_items "$work/gate.xml" passed || fail "not every cuda item passed"
      done_step "gate"
    else
      step "no GPU: --quantgate-ep cuda must skip every cuda item (never pass)"
      # these runs are expected to skip/error: their pytest output goes to a log, shown only if a check fails
      rc=0; gate "$work/skip.xml" -rs >"$work/skip.log" 2>&1 || rc=$?
      [[ "$rc" == 0 ]] || { cat "$work/skip.log" >&2; fail "pytest exited $rc; skips alone must exit 0"; }
      check_items "$work/skip.xml" skipped || { cat "$work/skip.log" >&2; fail "a cuda item was not skipped"; }
      done_step "skip check"
      step "no GPU: --quantgate-ep cuda --quantgate-strict-ep must error every cuda item"
      rc=0; gate "$work/strict.xml" --quantgate-strict-ep >"$work/strict.log" 2>&1 || rc=$?
      [[ "$rc" != 0 ]] || { cat "$work/strict.log" >&2; fail "the strict cuda gate exited 0 without a GPU"; }
      check_items "$work/strict.xml" error || { cat "$work/strict.log" >&2; fail "a cuda item did not error under --quantgate-strict-ep"; }
      done_step "strict check"
    fi
    ;;
esac
awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "== ep_gate['"$ep"']: OK in %.1f s\n", b - a }' >&2
