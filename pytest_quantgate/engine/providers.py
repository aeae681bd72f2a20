"""Execution providers: which ones exist, how to open a session on one, and proof that it really runs there.

What "really runs there" means, per EP (measured with onnxruntime 1.31.1, onnxruntime-gpu 1.31.1 and
onnxruntime-openvino 1.24.1; the tests in ``tests/test_providers.py`` and ``.ci/ep_gate.sh`` check it):

* ``cpu``: the CPU EP alone.
* ``openvino``: ``OpenVINOExecutionProvider`` alone, with the session config ``session.disable_cpu_ep_fallback=1``,
  so ORT refuses the session unless OpenVINO takes every node. The CPU EP is not listed (ORT rejects listing it
  together with that config). A result recorded as ``openvino`` is therefore never a CPU/OpenVINO mix.
  Provider options: ``device_type`` (CPU, GPU, NPU, ``GPU.0``, ...) and ``precision`` (FP32, FP16, ACCURACY;
  upper case: 1.24.1 rejects ``fp32``). OpenVINO checks precision per device: CPU accepts FP32 and ACCURACY, GPU
  FP32/FP16/ACCURACY (its default is FP16, hence the gate's FP32 default), NPU FP16/ACCURACY.
  When OpenVINO cannot be *created* (device missing, precision not allowed on the device) ORT only logs the
  reason and carries on without it; with fallback disabled the session then fails with a misleading
  "nodes assigned to the default CPU EP" message. :func:`open_session` reads ORT's log and reports the real
  reason ("[OpenVINO] Device GPU is not available").
* ``cuda``: ``CUDAExecutionProvider`` first and the CPU EP after it. The CPU EP stays listed on purpose: ORT has no
  CUDA kernels for several int8 ops (QLinearConv, QLinearAdd, ...) and puts shape ops on CPU by design, so
  disabling CPU fallback would refuse most int8 sidecars. What is refused instead is ORT's *silent* fallback:
  onnxruntime-gpu lists the CUDA EP even when the CUDA/cuDNN libraries are missing, and a session asked for CUDA
  then runs on ``['CPUExecutionProvider']`` with nothing but a log line. Each CUDA session is therefore created
  with verbose logging captured, and it is refused (EpUnavailableError) unless ``get_providers()[0]`` is the CUDA
  EP *and*, when ORT's node-placement log is readable, at least one node was placed on it. The reason quotes
  ORT's own log line, e.g. the library that failed to load.

Dynamic int8 on OpenVINO (decision). With the bundled registry every graph is placed wholly on OpenVINO, CPU
fallback disabled: MatMulInteger/DynamicQuantizeLinear (dynamic MLP) and QDQ Conv graphs (static, QAT) all run.
Dynamic int8 *Conv* graphs do not: onnxruntime-openvino 1.24.1 refuses any graph with DynamicQuantizeLinear ->
ConvInteger with "the graph is not acyclic", *with or without* CPU fallback, while the CPU EP loads the same file.
Allowing fallback would therefore not help those, and for nodes OpenVINO merely lacks it would record a CPU/OpenVINO
mix as "openvino". So the gate never allows CPU fallback on OpenVINO. A graph OpenVINO cannot take is reported as
EpUnavailableError (a skip, or an error under ``--quantgate-strict-ep``) whose message names the nodes: for
unsupported nodes, those ORT placed on CPU in a diagnostic session with fallback allowed; for the ConvInteger
failure, the ConvInteger nodes, with the remedy (quantise Conv statically, QDQ).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EpUnavailableError, ModelFileError
from ..settings import EpOptions
from .logcapture import capture_logs
from .ort import EXTRAS, import_onnxruntime

if TYPE_CHECKING:
    import onnxruntime as ort

ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
# the distribution that brings each EP: named in skip messages so the fix is obvious
PACKAGES = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu", "openvino": "onnxruntime-openvino"}
# ops that make onnxruntime-openvino 1.24.1 refuse the whole graph ("the graph is not acyclic"), with the remedy
OPENVINO_REFUSED_OPS = {
    "ConvInteger": "dynamic int8 Conv; quantise Conv statically (QDQ) to gate this model on OpenVINO",
}
_VERBOSE, _ERROR = 0, 3  # ORT log severities


# onnxruntime's U8S8 (and S8S8) int8 GEMM/conv kernels on x86 CPUs without VNNI multiply through vpmaddubsw,
# whose int16 pair sums saturate: the same sidecar then computes another result than on a CPU with VNNI (measured on
# an AVX2-only AMD EPYC: the bundled QAT sidecar dropped 0.0769 instead of 0.0015, a dynamic digits MLP 0.034
# instead of 0.0002 at batch 1). This session option makes those CPUs use the exact (U8U8) path instead; CPUs with
# VNNI sum exactly either way. With it the verdict means the same on every x86 CPU.
X64_PRECISION = {"session.x64quantprecision": "1"}


def int8_config(precision: str) -> dict[str, str]:
    """Return the CPU EP's session config entries for ``--quantgate-int8-precision`` (exact or fast)."""
    return dict(X64_PRECISION) if precision == "exact" else {}


def available() -> list[str]:
    """Return the gate's EP names the installed onnxruntime offers, in a fixed order."""
    ort = import_onnxruntime()

    offered = set(ort.get_available_providers())
    return [ep for ep, name in ORT_NAMES.items() if name in offered]


def expand(requested: tuple[str, ...]) -> list[str]:
    """Expand ``auto`` into the available EPs; keep explicit requests even when unavailable (they skip)."""
    out: list[str] = []
    for ep in requested:
        for name in available() if ep == "auto" else [ep]:
            if name not in out:
                out.append(name)
    return out


def ort_distribution() -> str:
    """Return which onnxruntime wheel is installed (they all install the same module)."""
    from importlib import metadata

    for dist in ("onnxruntime-openvino", "onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "onnxruntime (unknown distribution)"


@dataclass(frozen=True)
class SessionSpec:
    """What a session needs: the EP, its options, and the ORT configuration entries to apply."""

    ep: str
    options: EpOptions

    def providers(self) -> list[Any]:
        """Return the ``providers=`` argument for InferenceSession."""
        if self.ep == "cpu":
            return ["CPUExecutionProvider"]
        if self.ep == "cuda":
            # CPU stays listed: ORT places int8 QDQ nodes that CUDA has no kernel for on it by design
            return [("CUDAExecutionProvider", {"device_id": str(self.options.cuda_device_id)}), "CPUExecutionProvider"]
        return [("OpenVINOExecutionProvider", self.openvino_options())]

    def openvino_options(self) -> dict[str, str]:
        """Return the OpenVINO provider options (names and values as onnxruntime-openvino 1.24.1 accepts them)."""
        return {"device_type": self.options.openvino_device.upper(),
                "precision": self.options.openvino_precision.upper()}

    def config_entries(self) -> dict[str, str]:
        """Return session config entries; OpenVINO gets no silent CPU fallback, CPU kernels exact int8 sums."""
        if self.ep == "openvino":
            return {"session.disable_cpu_ep_fallback": "1"}
        return dict(int8_config(self.options.int8_precision))

    def describe(self) -> str:
        """Return the EP and its options, for messages."""
        if self.ep == "openvino":
            opts = self.openvino_options()
            return f"OpenVINOExecutionProvider(device_type={opts['device_type']}, precision={opts['precision']})"
        if self.ep == "cuda":
            return f"CUDAExecutionProvider(device_id={self.options.cuda_device_id})"
        return ORT_NAMES[self.ep]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "2026-11-22 05:49:58.660 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] message"
_LOG_LINE = re.compile(r"^\S+ \S+ \[(?P<level>[VIWEF]):onnxruntime:[^,\]]*, (?P<where>[^\]]*)\] ?(?P<msg>.*)$")
_PLACED = re.compile(r"^(?:All nodes|Node\(s\)) placed on \[(?P<ep>\w+)\]\. Number of nodes: (?P<n>\d+)")
_NODE = re.compile(r"^ {1,2}(?P<op>[A-Za-z0-9_.]+) \((?P<name>.*)\)$")


def log_records(text: str) -> list[tuple[str, str]]:
    """Return ORT's log as (level, message) pairs; continuation lines are appended to the previous message."""
    records: list[tuple[str, str]] = []
    for raw in _ANSI.sub("", text).splitlines():
        match = _LOG_LINE.match(raw)
        if match:
            records.append((match["level"], match["msg"]))
        elif raw.strip() and records:
            level, msg = records[-1]
            records[-1] = (level, f"{msg} {raw.strip()}")
    return records


def placements(text: str) -> dict[str, list[str]] | None:
    """Return {EP: nodes} from ORT's verbose "Node placements" log, or None when the log has none.

    ORT lists the nodes one by one for the CPU EP only ("OpType (name)"); other EPs get ``n`` placeholders.
    """
    counts: dict[str, int] = {}
    nodes: dict[str, list[str]] = {}
    current: str | None = None
    for level, msg in log_records(text):
        if level != "V":
            continue
        placed = _PLACED.match(msg.strip())
        node = _NODE.match(msg)
        if placed:
            current = placed["ep"]
            counts[current] = int(placed["n"])
            nodes[current] = []
        elif node and current is not None:
            nodes[current].append(f"{node['op']} ({node['name']})")
        else:
            current = None
    if not counts:
        return None
    return {ep: nodes[ep] or ["?"] * n for ep, n in counts.items()}


def _problems(text: str, printed: str, provider: str) -> list[str]:
    """Return ORT's error and warning lines that concern ``provider`` (or name a library that failed to load)."""
    short = provider.removesuffix("ExecutionProvider")
    out: list[str] = []
    for level, msg in log_records(text):
        if level in ("E", "F", "W") and (short in msg or "Failed to load library" in msg
                                         or f"[{short}]" in msg):
            # provider_bridge prefixes the C++ source location: keep what follows "[ERROR]" or "FAIL :"
            for marker in ("[ERROR] ", "FAIL : "):
                if marker in msg:
                    msg = msg.split(marker, 1)[1]
            msg = msg.strip()
            if msg and msg not in out:
                out.append(msg)
    for line in printed.splitlines():
        if line.startswith("EP Error"):
            out.append(" ".join(line.split()))
    # OpenVINO's own "[OpenVINO] Device GPU is not available" says it all; drop ORT's generic "Please refer ..." then
    specific = [m for m in out if f"[{short}]" in m]
    # a library that failed to load (CUDA/cuDNN missing) is the most useful line: put it first
    return specific or sorted(out, key=lambda m: "Failed to load library" not in m)


def _create(path: Path, providers: list[Any], config: dict[str, str], *, severity: int,
            threads: int | None) -> tuple[Any, BaseException | None, str, str]:
    """Create a session; return (session or None, exception or None, ORT's log, what ORT's wrapper printed)."""
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.log_severity_level = severity
    # no memory pattern: ORT would plan and keep one block per distinct input shape (the gate's first chunk of
    # one sample, the full chunks, the last one); measured peak RSS 133-178 MiB instead of 146-211 MiB on the
    # bench models, and no slower
    options.enable_mem_pattern = False
    # ORT's pool threads spin after each run by default: the gate then folds the outputs into its sums on the same
    # cores, and spinning threads take those cycles (measured on 2 busy cores: img 100 samples, evaluate 2.8 s
    # without spinning vs 6.2 s with, ORT's own share 2.1 s vs 4.4 s)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    session = None
    error: BaseException | None = None
    # ORT reports a CUDA library that fails to load, or a missing OpenVINO device, only in its fd-2 log, and its
    # Python wrapper prints "EP Error ... Falling back to ['CPUExecutionProvider'] and retrying" to stdout
    with capture_logs(records=False, native=True, stdout=True) as out:
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            error = exc
    return session, error, out.native, out.printed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _shorten(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _loads_on_cpu(path: Path) -> BaseException | None:
    """Return None when the CPU EP loads the model, else its exception (the model itself is broken)."""
    _, error, _, _ = _create(path, ["CPUExecutionProvider"], {}, severity=_ERROR, threads=1)
    return error


def _openvino_failure(path: Path, spec: SessionSpec, error: BaseException, log: str, printed: str) -> Exception:
    """Explain why OpenVINO refused a session: EP not created, nodes it cannot take, or a graph it cannot load."""
    wanted = spec.describe()
    problems = _problems(log, printed, "OpenVINOExecutionProvider")
    if problems:
        # the provider itself could not be created: the same for every model, so name what is missing
        return EpUnavailableError(f"openvino: {wanted} could not be created: {'; '.join(problems)}")
    # Diagnose with CPU fallback allowed and ORT's verbose placement log: which nodes would OpenVINO leave to CPU?
    _, retry_error, retry_log, _ = _create(path, spec.providers(), {}, severity=_VERBOSE, threads=1)
    if retry_error is None:
        placed = placements(retry_log) or {}
        on_cpu = placed.get("CPUExecutionProvider", [])
        if on_cpu:
            return EpUnavailableError(
                f"openvino: {path}: OpenVINO cannot take {len(on_cpu)} node(s): {_shorten(on_cpu)}; CPU fallback is "
                f"disabled so an 'openvino' result is never a CPU/OpenVINO mix"
            )
        return EpUnavailableError(f"openvino: {path}: {wanted} refused the session: {_first_line(error)}")
    cpu_error = _loads_on_cpu(path)
    if cpu_error is not None:
        return ModelFileError(f"{path}: onnxruntime cannot load the model: {_first_line(cpu_error)}")
    refused = _refused_nodes(path)
    detail = ""
    if refused:
        ops = sorted({op for op, _ in refused})
        hints = "; ".join(f"{op}: {OPENVINO_REFUSED_OPS[op]}" for op in ops)
        detail = f"; OpenVINO cannot take {_shorten([f'{op} ({name})' for op, name in refused])} ({hints})"
    return EpUnavailableError(
        f"openvino: {path}: {ort_distribution()} cannot load this graph ({_first_line(retry_error)}), "
        f"even with CPU fallback allowed, while the CPU EP loads it{detail}"
    )


def _refused_nodes(path: Path) -> list[tuple[str, str]]:
    """Return (op, name) of the nodes whose op type OpenVINO is known to refuse the whole graph for."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # the caller already knows the CPU EP loads it; a parse failure here only loses the detail
        return []
    return [(n.op_type, n.name or "?") for n in model.graph.node if n.op_type in OPENVINO_REFUSED_OPS]


def open_session(path: Path, spec: SessionSpec, *, threads: int | None = None) -> ort.InferenceSession:
    """Open an ORT session on exactly the requested EP, or raise EpUnavailableError/ModelFileError."""
    ort = import_onnxruntime()

    wanted = ORT_NAMES[spec.ep]
    if wanted not in ort.get_available_providers():
        raise EpUnavailableError(
            f"{spec.ep}: {wanted} is not offered by the installed {ort_distribution()}; "
            f"install {PACKAGES[spec.ep]} (one onnxruntime wheel per virtualenv: in a fresh one, "
            f"pip install 'pytest-quantgate[{EXTRAS[PACKAGES[spec.ep]]}]')"
        )
    # CUDA: verbose log so the node placements can be read (creation only; runs log at their own level)
    severity = _VERBOSE if spec.ep == "cuda" else _ERROR
    session, error, log, printed = _create(path, spec.providers(), spec.config_entries(), severity=severity,
                                           threads=threads)
    if error is not None:
        if spec.ep == "openvino":
            raise _openvino_failure(path, spec, error, log, printed) from None
        if spec.ep != "cpu" and _loads_on_cpu(path) is None:
            problems = _problems(log, printed, wanted)
            hint = f" (onnxruntime said: {'; '.join(problems)[:600]})" if problems else ""
            raise EpUnavailableError(f"{spec.ep}: {path}: {spec.describe()} cannot run this model: "
                                     f"{_first_line(error)}{hint}") from None
        raise ModelFileError(f"{path}: onnxruntime cannot load the model: {_first_line(error)}") from None
    running = session.get_providers()
    problems = _problems(log, printed, wanted)
    hint = f" (onnxruntime said: {'; '.join(problems)[:600]})" if problems else ""
    if not running or running[0] != wanted:
        raise EpUnavailableError(
            f"{spec.ep}: asked for {spec.describe()} but the session runs on {running}; ORT fell back silently{hint}"
        )
    placed = placements(log) if spec.ep == "cuda" else None
    if placed is not None and not placed.get(wanted):
        raise EpUnavailableError(
            f"{spec.ep}: {path}: {wanted} took none of the nodes "
            f"({', '.join(f'{ep}: {len(n)}' for ep, n in placed.items())}"
            f"); ORT fell back silently{hint}"
        )
    return session
