"""Where an int8 sidecar loses accuracy: per-tensor SQNR of weights and activations, fp32 vs int8, in bounded memory.

Use it after a gate failure to find the tensors worth excluding. ``diagnose`` runs both models on a few feeds (the
samples where fp32 and int8 disagree most) and ranks tensors by the quantisation noise they add (SQNR in dB,
20·log10(‖x‖/‖x − x̂‖); lower is worse).

Memory stays bounded: intermediate tensors are never all collected. Each model is saved once into a private temporary
folder with its weights in one external-data file; then, group after group, a copy of the graph whose outputs are just
that group's tensors is run on the feeds one feed at a time, the SQNR sums are accumulated in float64 chunk by chunk,
and the arrays are dropped before the next group. Groups are sized from the tensors' byte sizes (ONNX shape inference
with the feeds' shapes) against ``memory_bytes``.

Weights are not read here: ``qgraph`` reads the int8 graph (any form, weights in initializers, Constant nodes or
external data), dequantises every weight in float64 and pairs it with its fp32 origin by name, else by value (ORT's
fusions such as ``ConvBnFusion_*`` folded the same way), as it does for the lineage check; each weight's SQNR is
ranked with the activations.

* QDQ sidecars (static PTQ, QAT): every activation before its QuantizeLinear and after its DequantizeLinear, and the
  fp32 model's tensor of the same name.
* Dynamic sidecars (MatMulInteger/ConvInteger with DynamicQuantizeLinear): activations are quantised at run time, per
  batch, so their local error is simulated from the DynamicQuantizeLinear formula and there is no calibrated range
  to fix.
* Anything else (QOperator graphs): per-output comparison, plus the weights.

Temporary folders are named ``quantgate-diagnose-<pid>-*`` and hold a locked ``owner.lock`` while their owner lives;
each diagnosis first removes the folders whose owner is gone (a killed run), whatever their age. ORT sessions log at
ERROR and up only, and Python log records of onnxruntime/onnx tooling are captured and counted in the notes.
``diagnose`` never raises: what could not be analysed is said in ``Diagnosis.notes``.

With a :class:`~pytest_quantgate.records.Focus` (what the gate found failing: an output, and channels or class
rows of it), tensors are ranked by how much of the failure they can explain (``paths.tensors_on_path``): first the
tensors that feed the focused channels and nothing else the graph computes (a class branch), then the path tensors
shared with what did not fail (the backbone: were it the cause, the other channels would fail too), then the
tensors off the path; by SQNR within each group, and within the path groups a tensor closer to the output first
among tensors within ``TIE_DB`` of each other. The outputs part then also reports the focused channels' slice of
the failing output.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.logcapture import capture_logs
from ..fileio import scratch_folder, scratch_prefix, sweep_scratch
from ..records import Diagnosis, Focus, TensorError
from .paths import PathInfo, tensors_on_path
from .qgraph import (
    CHUNK,
    Graph,
    Pairing,
    SqnrSums,
    base_name,
    dynamic_qdq,
    format_db,
    int8_format,
    measure,
    pair_weights,
)

# a weight with more than this share of elements off by over one int8 step was not just rounded
CHANGED_SHARE = 0.01
TEMP_PREFIX = scratch_prefix("diagnose")
DEFAULT_MEMORY_BYTES = 1 << 30
# ORT's Python binding copies each output out of its own buffer, so a group's arrays exist twice during a run
RUN_COPIES = 2
# a tensor smaller than this (a bias, a tiny matrix) is compared only when paired with its fp32 origin by name
MATCH_MIN_SIZE = 16
# SQNRs within this many dB of each other are a tie: on the focused path the tensor closer to the output ranks first
TIE_DB = 1.0


# ---------------------------------------------------------------------------------------------------------------
# temporary folders: one per diagnosis, owned by a pid and a held lock; leftovers of dead owners are swept


def sweep_temp_folders(base: Path | None = None) -> list[Path]:
    """Remove ``quantgate-diagnose-<pid>-*`` folders under ``base`` (default: the temp dir) whose owner is gone."""
    return sweep_scratch(Path(base) if base is not None else Path(tempfile.gettempdir()), "diagnose")


@contextlib.contextmanager
def _workspace(base: Path | None) -> Iterator[tuple[Path, int]]:
    """Yield (a fresh locked temp folder, how many dead owners' folders were swept); always remove the folder."""
    with scratch_folder("diagnose", base, what="diagnosis working folder") as found:
        yield found


# ---------------------------------------------------------------------------------------------------------------
# models: loaded once, saved with external weights, and re-cut per group of outputs


def _externalise(src: Path, dst: Path) -> Any:
    """Save ``src`` as ``dst`` with its large initializers in one file beside it; return the weightless ModelProto.

    Every per-group model is saved into the same folder and points at that one weights file, so a group costs a
    small graph write, not a copy of the weights.
    """
    import onnx

    model = onnx.load(str(src))
    # small initializers (shapes, scales, zero points) stay inline: shape inference reads them
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.stem + ".weights", size_threshold=1024)
    return onnx.load(str(dst), load_external_data=False)


class _Graph(Graph):
    """One graph as ``qgraph`` models it (constants loaded on demand from ``base``), plus its activations."""

    def __init__(self, model: Any, base: Path) -> None:
        super().__init__(model, base)
        self.inputs = [i.name for i in model.graph.input]
        self.tensors = set(self.producer) | set(self.inputs)

    def keep_float(self, tensor: str) -> tuple[str, ...]:
        """Return the node names that quantise ``tensor`` (producer and consumers): excluding all keeps it float."""
        names: list[str] = []
        prod = self.producer.get(tensor)
        if prod is not None and prod.name:
            names.append(prod.name)
        names += [c.name for c in self.consumers.get(tensor, []) if c.name]
        return tuple(dict.fromkeys(names))

    def constant(self, tensor: str) -> bool:
        """Return whether ``tensor`` is a weight (an initializer or a Constant node's output), not an activation."""
        prod = self.producer.get(tensor)
        return tensor in self.initializers or (prod is not None and prod.op_type == "Constant")


def _session(path: Path, optimised: bool, exact: bool = True) -> Any:
    import onnxruntime as ort

    from ..engine.providers import int8_config

    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT's warnings (e.g. unused initializers of a cut graph) are not the user's problem
    # no arena: what a group's run allocated goes back to the system before the next group
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    # idle ORT threads spin by default and starve the numpy sums run between two runs
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimised:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in int8_config("exact" if exact else "fast").items():  # the gate's int8 kernels
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _model_feeds(graph: _Graph, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    names = [n for n in graph.inputs if n not in graph.initializers]
    missing = [n for n in names if any(n not in f for f in feeds)]
    if missing:
        raise ValueError(f"the feeds lack model input(s) {missing}")
    return [{n: np.asarray(f[n]) for n in names} for f in feeds]


def _tensor_bytes(graph: _Graph, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, int]:
    """Return the byte size per feed of every tensor ONNX shape inference can size, with the largest feed's shapes."""
    import onnx
    from onnx import helper

    sizes: dict[str, int] = {}
    if not feeds:
        return sizes
    largest = max(feeds, key=lambda f: sum(np.asarray(v).nbytes for v in f.values()))
    probe = onnx.ModelProto()
    probe.CopyFrom(graph.model)  # weightless: the initializers live in the external file
    for inp in probe.graph.input:
        if inp.name in largest and inp.type.HasField("tensor_type"):
            shape = np.shape(largest[inp.name])
            dims = inp.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dims.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # an odd graph: sizes stay unknown and are estimated by the caller
        inferred = probe
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tt = info.type.tensor_type
        if not info.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if any(d < 0 for d in dims):
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):  # a type numpy has no dtype for: count it as 4 bytes
            itemsize = 4
        sizes[info.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    for name, value in largest.items():
        sizes[name] = np.asarray(value).nbytes
    return sizes


@dataclass(frozen=True)
class _Probe:
    """One activation to compare: the int8 model tensors before/after quantisation and the fp32 model tensor."""

    tensor: str  # the name shown (the fp32 tensor when matched)
    pre: str  # int8 model tensor before its QuantizeLinear (dynamic: the DynamicQuantizeLinear input)
    post: str | None  # int8 model tensor after its DequantizeLinear (dynamic: None, the Q/DQ is simulated)
    twin: str | None  # the fp32 model tensor
    floor: float | None  # a Relu fused into the quantisation range: clamp ``pre`` before comparing
    nbytes: int  # bytes per feed of the arrays this probe holds at once (ORT's copy during a run not counted)


@dataclass(frozen=True)
class _Plan:
    """How the activation probes were grouped under the memory bound."""

    groups: tuple[tuple[_Probe, ...], ...]
    budget: int
    unknown: int  # probes whose size shape inference could not tell (estimated as the largest known)
    oversized: int  # probes larger than the budget on their own (run alone)


def _plan(probes: Sequence[_Probe], budget: int, unknown: int) -> _Plan:
    groups: list[tuple[_Probe, ...]] = []
    current: list[_Probe] = []
    held = 0
    oversized = 0
    for probe in probes:
        cost = probe.nbytes * RUN_COPIES
        if cost > budget:
            oversized += 1
        if current and held + cost > budget:
            groups.append(tuple(current))
            current, held = [], 0
        current.append(probe)
        held += cost
    if current:
        groups.append(tuple(current))
    return _Plan(tuple(groups), budget, unknown, oversized)


def _cut(graph: _Graph, names: Sequence[str], tmp: Path, tag: str) -> Path:
    """Save a copy of ``graph`` cut down to what computes ``names``, with exactly those outputs; return its path.

    Nodes and initializers the outputs do not need are dropped, so an early group runs a short graph and ORT reads
    only the weights it uses from the shared weights file.
    """
    import onnx
    from onnx import TensorProto, helper

    needed: set[str] = set(names)
    keep: list[Any] = []
    for node in reversed(graph.model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(_node_reads(node))
    cut = onnx.ModelProto()
    cut.CopyFrom(graph.model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*cut.graph.value_info, *cut.graph.output)
             if v.type.HasField("tensor_type")}
    del cut.graph.output[:]
    for name in names:
        cut.graph.output.append(helper.make_tensor_value_info(name, types.get(name) or TensorProto.FLOAT, None))
    del cut.graph.node[:]
    cut.graph.node.extend(reversed(keep))
    inits = [i for i in cut.graph.initializer if i.name in needed]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(inits)
    path = tmp / f"{tag}.onnx"
    onnx.save_model(cut, str(path))
    return path


def _node_reads(node: Any) -> list[str]:
    """Return the tensors ``node`` reads, including those its subgraphs (If/Loop/Scan bodies) take from outside."""
    reads = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            for inner in sub.node:
                reads += _node_reads(inner)
    return reads


def _run_cut(graph: _Graph, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]], tmp: Path,
             tag: str) -> Generator[dict[str, np.ndarray], None, None]:
    """Yield, feed by feed, the values of tensors ``names`` (graph inputs come from the feed itself)."""
    wanted = [n for n in dict.fromkeys(names) if n not in graph.inputs]
    path = _cut(graph, wanted, tmp, tag) if wanted else None
    session = _session(path, optimised=False) if path is not None else None
    try:
        for feed in feeds:
            values = dict(zip(wanted, session.run(wanted, dict(feed)))) if session is not None else {}
            values.update({n: feed[n] for n in names if n in graph.inputs})
            yield values
            del values
    finally:
        del session
        if path is not None:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# activations


def _qdq_probes(fgraph: _Graph, qgraph: _Graph) -> tuple[list[_Probe], int]:
    """Return the Q→DQ activation pairs of the int8 graph in graph order, and how many have no fp32 twin."""
    probes: list[_Probe] = []
    seen: set[str] = set()
    unmatched = 0
    for node in qgraph.model.graph.node:
        if node.op_type != "QuantizeLinear" or not node.input or qgraph.constant(node.input[0]):
            continue
        pre = node.input[0]
        dq = next((c for c in qgraph.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
        if dq is None or pre in seen:
            continue
        seen.add(pre)
        post = dq.output[0]
        candidates = [_strip(pre, "_QuantizeLinear_Input"), pre, _strip_dq(post), post]
        twin = next((c for c in candidates if c is not None and c in fgraph.tensors), None)
        unmatched += twin is None
        probes.append(_Probe(twin or pre, pre, post, twin, _fused_relu_floor(node, qgraph), 0))
    return probes, unmatched


def _strip(name: str, suffix: str) -> str | None:
    return name[: -len(suffix)] if name.endswith(suffix) else None


def _strip_dq(name: str) -> str | None:
    found = re.fullmatch(r"(.+)_DequantizeLinear_Output(?:_\d+)?", name)
    return found.group(1) if found else None


def _fused_relu_floor(q_node: Any, qgraph: _Graph) -> float | None:
    """Return 0.0 when QuantizeLinear ``q_node`` has its zero point at the type's minimum (a Relu fused into it)."""
    if len(q_node.input) < 3 or q_node.input[2] not in qgraph.initializers:
        return None
    zp = qgraph.array(q_node.input[2])
    if zp is not None and zp.dtype.kind in "iu" and zp.size and np.all(zp == np.iinfo(zp.dtype).min):
        return 0.0
    return None


def _dynamic_probes(fgraph: _Graph, qgraph: _Graph) -> list[_Probe]:
    probes: list[_Probe] = []
    for node in qgraph.model.graph.node:
        if node.op_type != "DynamicQuantizeLinear" or not node.input or qgraph.constant(node.input[0]):
            continue
        name = node.input[0]
        if any(p.pre == name for p in probes):
            continue
        probes.append(_Probe(name, name, None, name if name in fgraph.tensors else None, None, 0))
    return probes


def _sized(probes: Sequence[_Probe], fsizes: Mapping[str, int], qsizes: Mapping[str, int]
           ) -> tuple[list[_Probe], int]:
    """Attach each probe's bytes per feed (unknown sizes: the largest known tensor); return them and the unknowns."""
    known = [*fsizes.values(), *qsizes.values()]
    fallback = max(known) if known else CHUNK * 4
    out: list[_Probe] = []
    unknown = 0
    for p in probes:
        parts = [qsizes.get(p.pre), qsizes.get(p.post) if p.post else None, fsizes.get(p.twin) if p.twin else None]
        size = next((s for s in parts if s is not None), None)
        if size is None:
            unknown += 1
            size = fallback
        # at most two arrays of a probe are alive at once: int8 pre and post, then post and the fp32 twin
        out.append(_Probe(p.tensor, p.pre, p.post, p.twin, p.floor, size * 2))
    return out, unknown


def _compare_activations(plan: _Plan, fgraph: _Graph, qgraph: _Graph, ffeeds: Sequence[Mapping[str, np.ndarray]],
                         qfeeds: Sequence[Mapping[str, np.ndarray]], tmp: Path, path: PathInfo | None = None
                         ) -> list[tuple[TensorError, str]]:
    """Run each group's cut models feed by feed and fold the SQNR sums; no group's arrays outlive its feed.

    A tensor whose focused channels ``path`` followed is measured on those channels only (the rest of it does not
    feed what failed) and shown as that slice.
    """
    out: list[tuple[TensorError, str]] = []
    sliced: set[str] = set()

    def cut(p: _Probe, array: np.ndarray) -> np.ndarray:
        if path is None or path.axis is None or p.twin is None or p.twin not in path.channels:
            return array
        axis, picked = path.axis, sorted(path.channels[p.twin])
        if array.ndim <= axis or len(picked) >= array.shape[axis] or picked[-1] >= array.shape[axis]:
            return array  # all of it is focused, or not the shape the path was traced with: the whole tensor
        sliced.add(p.pre)
        return np.take(array, picked, axis=axis)

    for index, group in enumerate(plan.groups):
        local = {p.pre: SqnrSums() for p in group}
        cross = {p.pre: SqnrSums() for p in group}
        q_names = [n for p in group for n in (p.pre, p.post) if n is not None]
        f_names = [p.twin for p in group if p.twin is not None]
        q_runs = _run_cut(qgraph, q_names, qfeeds, tmp, f"int8.g{index}")
        f_runs = _run_cut(fgraph, f_names, ffeeds, tmp, f"fp32.g{index}") if f_names else None
        try:
            for _ in range(len(qfeeds)):
                qv = next(q_runs)
                tested: dict[str, np.ndarray] = {}
                for p in group:
                    pre = np.asarray(qv.pop(p.pre) if p.post is not None else qv[p.pre])
                    if p.post is not None:
                        post = np.asarray(qv[p.post])
                        local[p.pre].add(cut(p, pre), cut(p, post), p.floor)
                        tested[p.pre] = post
                    else:
                        local[p.pre].add(cut(p, pre), cut(p, dynamic_qdq(pre, np.float32)[0]))
                        tested[p.pre] = pre
                    del pre
                del qv
                if f_runs is not None:
                    fv = next(f_runs)
                    for p in group:
                        if p.twin is not None:
                            cross[p.pre].add(cut(p, np.asarray(fv[p.twin])), cut(p, tested[p.pre]))
                    del fv
                del tested
        finally:
            q_runs.close()
            if f_runs is not None:
                f_runs.close()
        for p in group:
            twin_sums = cross[p.pre]
            xmodel = twin_sums.db() if p.twin is not None and not twin_sums.mismatch else None
            exclude = fgraph.keep_float(p.tensor)
            node = fgraph.producer[p.tensor].name if p.tensor in fgraph.producer else (exclude[0] if exclude else None)
            shown = p.tensor
            if p.pre in sliced and path is not None and p.twin is not None:
                shown = _slice_name(p.tensor, path.axis, sorted(path.channels[p.twin]))
            out.append((TensorError("activation", shown, node, local[p.pre].db(), xmodel, exclude), p.tensor))
    return out


# ---------------------------------------------------------------------------------------------------------------
# weights


@dataclass(frozen=True)
class _Weight:
    error: TensorError
    lsb_excess: float | None  # share of elements off by more than one quantisation step (rounding gives 0)
    how: str = "name"  # how qgraph paired it with its fp32 origin: name or value, + an op folded into it
    origin: str = ""  # the fp32 initializer it was paired with (the name the focused path knows)


@dataclass(frozen=True)
class _Weights:
    """The int8 weights compared with their fp32 origin, the notes on the others, and whether one is per tensor."""

    compared: tuple[_Weight, ...]
    notes: tuple[str, ...]
    per_tensor: bool  # a QDQ weight matrix with one scale for the whole tensor


# how qgraph names the op it folded into an fp32 weight -> how the notes say it
_FOLDED = {"+BatchNormalization": "BatchNorm", "+Mul": "Mul"}


def _compare_weights(fgraph: _Graph, qgraph: _Graph) -> _Weights:
    """Judge each quantised weight as ``qgraph`` pairs it with its fp32 origin: its SQNR, or why it is not compared.

    A vector (bias, BatchNorm parameter) or a matrix of fewer than ``MATCH_MIN_SIZE`` values is compared only when
    paired by its own name: short and often all positive, such tensors look alike, so a value match is a guess, and
    the fp32 origin of one a fusion folded is a parameter of the folded node, a node the int8 graph no longer has.
    """
    compared: list[_Weight] = []
    renamed: list[Pairing] = []
    skipped: list[str] = []
    unmatched: list[str] = []
    per_tensor = False
    for p in pair_weights(qgraph, fgraph):
        t = p.tensor
        if t.kind == "float":
            continue
        if p.fp32_name is None:
            unmatched.append(t.name)
            continue
        plain = p.how.startswith("name") and "+" not in p.how
        if not plain and (t.values.ndim < 2 or t.values.size < MATCH_MIN_SIZE):
            skipped.append(t.name)
            continue
        if not plain:
            renamed.append(p)
        per_tensor = per_tensor or (t.kind == "qdq" and t.granularity == "tensor" and t.values.ndim > 1)
        compared.append(_weight(p, fgraph))
    notes: list[str] = []
    if renamed:
        shown = ", ".join(f"{p.tensor.name!r}→{p.fp32_name!r}" for p in renamed[:3])
        by_value = sum(p.how.startswith("value") for p in renamed)
        way = ("by shape and value" if by_value == len(renamed) else "by name" if by_value == 0
               else "by name or by shape and value")
        folds = [label for p in renamed for label in _FOLDED if label in p.how]
        ops = " or ".join(_FOLDED[label] for label in sorted(set(folds)))
        notes.append(f"{len(renamed)} int8 weight(s) renamed by ORT's fusions were matched to their fp32 origin {way} "
                     f"({shown}{' ...' if len(renamed) > 3 else ''})"
                     + (f"; {len(folds)} with the per-channel scale (a folded {ops}) applied to the fp32 weight as "
                        f"ORT folds it" if folds else ""))
    if skipped:
        names = ", ".join(repr(k) for k in skipped[:3])
        notes.append(f"{len(skipped)} small int8 tensor(s) (biases, BatchNorm parameters) paired with an fp32 tensor "
                     f"only by value or through a folded op ({names}{' ...' if len(skipped) > 3 else ''}): "
                     f"not compared")
    if unmatched:
        names = ", ".join(repr(k) for k in unmatched[:3])
        notes.append(f"{len(unmatched)} int8 weight(s) matched no fp32 initializer by name or value ({names}"
                     f"{' ...' if len(unmatched) > 3 else ''}): not compared")
    return _Weights(tuple(compared), tuple(notes), per_tensor)


def _weight(p: Pairing, fgraph: _Graph) -> _Weight:
    match = measure(p)
    origin = str(p.fp32_name)
    consumers = [c.name for c in fgraph.consumers.get(origin, []) if c.name] or list(p.tensor.consumers)
    # the int8 name is shown too when it does not say where the weight came from (a fusion's or an exporter's)
    shown = origin if base_name(p.tensor.name) == origin else f"{origin} ({p.tensor.name})"
    error = TensorError("weight", shown, consumers[0] if consumers else None, match.sqnr_db, None,
                        tuple(dict.fromkeys(consumers)))
    return _Weight(error, match.off_step, p.how, origin)


# ---------------------------------------------------------------------------------------------------------------
# outputs and the verdict


def _outputs(fp32: Path, int8: Path, ffeeds: Sequence[Mapping[str, np.ndarray]],
             qfeeds: Sequence[Mapping[str, np.ndarray]], exact: bool, focus: Focus | None = None
             ) -> tuple[list[TensorError], list[str]]:
    """Return the SQNR of every output the gate compares, and a note for each one left out.

    A sequence of maps (skl2onnx's ZipMap probabilities) is compared as the gate compares it, a (samples, keys)
    array in key order; other non-tensor outputs and string tensors have no SQNR and are named in the notes.
    A focus that names channels adds the SQNR of that output's focused slice, right after the output's own.
    """
    from ..engine.sessions import as_array
    from ..io.soak import TensorSpec

    ref_s, test_s = _session(fp32, True, exact), _session(int8, True, exact)
    specs = [TensorSpec(o.name, o.type, ()) for o in ref_s.get_outputs()]
    notes: list[str] = []
    kept: list[TensorSpec] = []
    for spec in specs:
        if spec.type.startswith("seq(map(") or (spec.type.startswith("tensor(") and spec.type != "tensor(string)"):
            kept.append(spec)
        else:
            notes.append(f"output {spec.name!r} ({spec.type}) not compared: the diagnosis compares numeric tensors "
                         f"and sequences of maps")
    names = [spec.name for spec in kept]
    sums = {name: SqnrSums() for name in names}
    sliced = focus is not None and focus.channel_axis is not None and bool(focus.channels) and focus.output in sums
    part = SqnrSums()
    part_note: str | None = None
    for ffeed, qfeed in zip(ffeeds, qfeeds):
        ref = ref_s.run(names, dict(ffeed))
        test = test_s.run(names, dict(qfeed))
        for spec, r, t in zip(kept, ref, test):
            if spec.name not in sums:
                continue
            try:
                a, b = as_array(r, spec, str(fp32)), as_array(t, spec, str(int8))
            except Exception as exc:  # maps of one run with different keys: this output is left out, said why
                notes.append(f"output {spec.name!r} ({spec.type}) not compared: {exc}")
                del sums[spec.name]
                continue
            sums[spec.name].add(a, b)
            if sliced and focus is not None and spec.name == focus.output and part_note is None:
                part_note = _add_slice(part, a, b, focus)
        del ref, test
    found: list[TensorError] = []
    for n, s in sums.items():
        found.append(TensorError("output", n, None, None, None if s.mismatch else s.db()))
        if sliced and focus is not None and n == focus.output:
            if part_note is None:
                found.append(TensorError("output", _slice_name(n, focus.channel_axis, focus.channels), None, None,
                                         None if part.mismatch else part.db()))
            else:
                notes.append(part_note)
    return found, notes


def _add_slice(sums: SqnrSums, ref: np.ndarray, test: np.ndarray, focus: Focus) -> str | None:
    """Add the focused channels of one run's output to ``sums``; return why they could not be, else None."""
    axis = focus.channel_axis
    ref, test = np.asarray(ref), np.asarray(test)
    if axis is None or not -ref.ndim <= axis < ref.ndim or ref.shape != test.shape:
        return (f"output {focus.output!r} has no axis {axis} as its focus names (shape {ref.shape}): the focused "
                f"channels were not compared on their own")
    width = ref.shape[axis]
    channels = [c for c in focus.channels if -width <= c < width]
    if len(channels) != len(focus.channels):
        return (f"output {focus.output!r} has {width} channel(s) along axis {axis}, fewer than its focus names: "
                f"the focused channels were not compared on their own")
    sums.add(np.take(ref, channels, axis=axis), np.take(test, channels, axis=axis))
    return None


def _slice_name(tensor: str, axis: int | None, channels: Sequence[int]) -> str:
    """Return how a focused slice is shown: numpy indexing, ``scores[:, 4:84]`` or ``scores[..., 3,7]``."""
    picked_list = list(channels)
    run = len(picked_list) > 1 and picked_list == list(range(picked_list[0], picked_list[0] + len(picked_list)))
    picked = f"{picked_list[0]}:{picked_list[-1] + 1}" if run else ",".join(str(c) for c in picked_list)
    axis = axis or 0
    lead = ":, " * axis if axis >= 0 else "..., " + ":, " * (-axis - 1)
    return f"{tensor}[{lead}{picked}]"


def _suggest(fmt: str, worst: Sequence[TensorError], outputs: Sequence[TensorError], weights_per_tensor: bool) -> str:
    if not worst:
        if fmt == "qoperator":
            return ("QOperator sidecars cannot be compared tensor by tensor; rebuild as QDQ (quant_format=QDQ) to "
                    "diagnose, or move the entry to a stronger mode")
        return "no per-tensor data: compare the outputs above and rebuild the sidecar"
    first = worst[0]
    exclude = ", ".join(repr(n) for n in first.exclude) or repr(first.node)
    db = format_db(first.rank_key)
    if fmt == "dynamic":
        if first.kind == "weight":
            return (f"weight {first.tensor!r} ({db} dB) loses most; dynamic mode quantises weights per tensor: try "
                    f"ptq-static with per_channel, or --nodes-to-exclude {exclude}")
        return (f"activation {first.tensor!r} ({db} dB) loses most to run-time quantisation; exclude its consumer "
                f"({exclude}) or move the entry to static (calibrated ranges) or qat mode")
    if first.kind == "weight":
        extra = " or enable per_channel" if weights_per_tensor else ""
        return (f"weight {first.tensor!r} ({db} dB) is the noisiest tensor: --nodes-to-exclude {exclude}{extra}; "
                f"if many weights are low, move to qat mode")
    return (f"activation {first.tensor!r} ({db} dB) is the noisiest tensor: --nodes-to-exclude {exclude} "
            f"(its producer and consumers in the fp32 graph), or recalibrate with --calibrate-method "
            f"percentile/entropy; "
            f"if the loss is spread over many tensors, move to qat mode")


def default_memory_bytes() -> int:
    """Return the default bound on intermediate tensors held at once: 1 GiB, or a quarter of what is left if less.

    "What is left" is the smaller of the available physical memory and the address-space limit (``ulimit -v``).
    """
    limits = [DEFAULT_MEMORY_BYTES]
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024 // 4)
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource  # POSIX only

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(int(soft) // 4)
    return max(16 << 20, min(limits))


def diagnose(fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]], *, top: int = 5,
             memory_bytes: int | None = None, temp_dir: Path | None = None, exact: bool = True,
             focus: Focus | None = None) -> Diagnosis:
    """Compare an int8 sidecar with its fp32 original on ``feeds`` and rank the noisiest tensors.

    ``feeds`` are ORT feed dicts: a few samples or small batches, e.g. those where fp32 and int8 disagree most.
    ``memory_bytes`` bounds the intermediate tensors held at once (default ``default_memory_bytes()``: 1 GiB or a
    quarter of the available memory); a single tensor larger than the bound is still compared, alone, and said in
    the notes. ``temp_dir`` is where the private working folder goes (default: the system temp dir). Nothing is
    written beside the models. ``focus`` (what the gate found failing) ranks the tensors that feed it first and
    marks each with ``on_path``; see the module docstring. Never raises: failures become ``Diagnosis.notes``.
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    budget = default_memory_bytes() if memory_bytes is None else max(1, int(memory_bytes))
    notes: list[str] = []
    try:
        # onnxruntime/onnx tooling logs (ORT's weight matcher logs ERROR:root for a renamed weight): counted here
        with capture_logs(level=logging.DEBUG, native=False) as logs, _workspace(temp_dir) as (tmp, swept):
            found = _diagnose(fp32_path, int8_path, feeds, top, budget, tmp, notes, exact, focus)
    except Exception as exc:  # the workspace itself failed (no temp folder, unwritable dir)
        return Diagnosis(str(fp32_path), str(int8_path), "unknown", len(feeds),
                         notes=(*notes, f"no temporary folder: {type(exc).__name__}: {exc}"))
    extra: list[str] = []
    if swept:
        extra.append(f"removed {swept} temporary folder(s) left by killed runs")
    caught = logs.summary()
    if caught.total:
        first = caught.messages[0]
        extra.append(f"suppressed {caught.total} log line(s) from onnxruntime/onnx (first: {first.level}: "
                     f"{first.text[:160]})")
    return replace(found, notes=(*found.notes, *extra))


def _diagnose(fp32_path: Path, int8_path: Path, feeds: Sequence[Mapping[str, np.ndarray]], top: int, budget: int,
              tmp: Path, notes: list[str], exact: bool = True, focus: Focus | None = None) -> Diagnosis:
    fmt = "unknown"
    analysed: list[str] = []
    named: list[tuple[TensorError, str]] = []  # each ranked tensor and its fp32 name (what paths know)
    weights: list[_Weight] = []
    outputs: list[TensorError] = []
    per_tensor_weights = False
    fp32, int8 = tmp / "fp32.onnx", tmp / "int8.onnx"
    try:
        fgraph = _Graph(_externalise(fp32_path, fp32), tmp)
        qgraph = _Graph(_externalise(int8_path, int8), tmp)
    except Exception as exc:  # unreadable models: nothing else can run
        return Diagnosis(str(fp32_path), str(int8_path), fmt, len(feeds), notes=(
            f"could not load the models: {type(exc).__name__}: {exc}",))
    fmt = int8_format(qgraph.model)
    if not feeds:
        notes.append("no feeds given: activations and outputs were not compared")

    def attempt(what: str, fn: Any) -> Any:
        try:
            result = fn()
        except Exception as exc:  # any ORT/onnx failure on an odd graph is reported, not raised
            notes.append(f"{what} not analysed: {type(exc).__name__}: {str(exc)[:300]}")
            return None
        analysed.append(what)
        return result

    ffeeds: list[dict[str, np.ndarray]] = []
    qfeeds: list[dict[str, np.ndarray]] = []
    if feeds:
        try:
            ffeeds, qfeeds = _model_feeds(fgraph, feeds), _model_feeds(qgraph, feeds)
        except ValueError as exc:
            notes.append(f"outputs and activations not analysed: {exc}")
    path = _path(fgraph, focus, notes) if focus is not None else None
    if ffeeds:
        found_o = attempt("outputs", lambda: _outputs(fp32, int8, ffeeds, qfeeds, exact, focus))
        if found_o is not None:
            outputs = found_o[0]
            notes += found_o[1]
    if fmt in ("qdq", "dynamic", "qoperator"):
        found_w: _Weights | None = attempt("weights", lambda: _compare_weights(fgraph, qgraph))
        if found_w is not None:
            weights += found_w.compared
            notes += found_w.notes
            per_tensor_weights = fmt == "qdq" and found_w.per_tensor
    if fmt == "dynamic":
        per_tensor_weights = True
    if fmt in ("qdq", "dynamic") and ffeeds:
        found_a = attempt("activations", lambda: _activations(fmt, fgraph, qgraph, ffeeds, qfeeds, tmp, budget,
                                                              path))
        if found_a is not None:
            named += found_a[0]
            notes += found_a[1]
    if fmt == "dynamic":
        notes.append("dynamic sidecar: activation ranges are computed per batch at run time, so there are no "
                     "calibrated scales to inspect or fix; activation 'local dB' is simulated from the "
                     "DynamicQuantizeLinear formula on the collected fp32-path inputs")
    elif fmt == "qoperator":
        notes.append("QOperator sidecar (QLinearConv/QLinearMatMul...): intermediate int8 tensors have no float "
                     "twin, so activations cannot be compared; only weights and outputs are")
    elif fmt == "unknown":
        notes.append("the int8 graph has no QuantizeLinear/DequantizeLinear, dynamic or QOperator nodes: "
                     "only outputs were compared")
    if "weights" in analysed and not weights:
        notes.append("no int8 weight matched an fp32 initializer by name or by value: weights not compared")
    changed = [w.error for w in weights if w.lsb_excess is not None and w.lsb_excess > CHANGED_SHARE]
    # a weight is shown by its origin, possibly with its int8 name beside it: the origin is what paths know
    named += [(w.error, w.origin) for w in weights if w.lsb_excess is None or w.lsb_excess <= CHANGED_SHARE]
    tensors = [t for t, _ in named]
    if changed:
        names = ", ".join(repr(t.tensor) for t in changed[:4]) + (" ..." if len(changed) > 4 else "")
        notes.append(f"{len(changed)} of {len(weights)} weight(s) differ from the fp32 original by more than one "
                     f"int8 step ({names}): the sidecar was trained (QAT) or built from another fp32 model; their "
                     f"SQNR measures that change, not rounding, so they are not ranked")
    if path is None:
        ranked = sorted(tensors, key=lambda t: (t.rank_key, t.kind, t.tensor))
    else:
        ranked = rank_on_path(named, path)
    worst = tuple(ranked[: max(0, top)])
    suggestion = _suggest(fmt, worst, outputs, per_tensor_weights)
    return Diagnosis(str(fp32_path), str(int8_path), fmt, len(feeds), worst, tuple(outputs), tuple(analysed),
                     suggestion, tuple(notes))


def _path(fgraph: _Graph, focus: Focus, notes: list[str]) -> PathInfo:
    """Return the fp32 tensors that feed ``focus``, saying in the notes what the ranking then means."""
    path = tensors_on_path(fgraph.model, focus)
    what = f" ({focus.what})" if focus.what else ""
    if not path.tensors:
        notes.append(f"focus{what}: the fp32 graph computes no output {focus.output!r}; tensors are ranked by SQNR "
                     f"alone")
    else:
        how = "its channels followed through the graph" if path.tracked else "its whole ancestry"
        notes.append(f"focus{what}: tensors feeding output {focus.output!r} ({how}: {len(path.tensors)} tensor(s), "
                     f"{len(path.tensors) - len(path.shared)} feeding nothing else) rank first")
    return path


def rank_on_path(named: Sequence[tuple[TensorError, str]], path: PathInfo) -> list[TensorError]:
    """Return the tensors marked ``on_path`` and ranked for a focus: specific to it, shared, off it; SQNR within.

    ``named`` pairs each tensor with its fp32 name. Within the two path groups, tensors whose SQNR lies within
    ``TIE_DB`` of the group's lowest not yet placed form a tie, and the tie is ordered closest to the output first.
    """
    groups: tuple[list[tuple[TensorError, int]], ...] = ([], [], [])
    for error, name in named:
        marked = replace(error, on_path=path.on_path(name))
        tier = 0 if path.specific(name) else 1 if path.on_path(name) else 2
        groups[tier].append((marked, path.distance.get(name, 0)))
    ranked: list[TensorError] = []
    for tier, group in enumerate(groups):
        group.sort(key=lambda pair: (pair[0].rank_key, pair[0].kind, pair[0].tensor))
        if tier == 2:
            ranked += [t for t, _ in group]
            continue
        while group:
            low = group[0][0].rank_key
            # sorted, so a tie is a prefix; inf - inf is nan: lossless tensors tie with each other only
            size = next((i for i, p in enumerate(group) if not (p[0].rank_key == low
                                                                 or p[0].rank_key - low <= TIE_DB)), len(group))
            tie = sorted(group[:size], key=lambda pair: (pair[1], pair[0].rank_key, pair[0].kind, pair[0].tensor))
            ranked += [t for t, _ in tie]
            del group[:size]
    return ranked


def _activations(fmt: str, fgraph: _Graph, qgraph: _Graph, ffeeds: Sequence[Mapping[str, np.ndarray]],
                 qfeeds: Sequence[Mapping[str, np.ndarray]], tmp: Path, budget: int, path: PathInfo | None = None
                 ) -> tuple[list[tuple[TensorError, str]], list[str]]:
    notes: list[str] = []
    if fmt == "qdq":
        raw, unmatched = _qdq_probes(fgraph, qgraph)
        if unmatched:
            first = next(p.pre for p in raw if p.twin is None)
            notes.append(f"{unmatched} quantised activation(s) have no fp32 tensor of the same name "
                         f"(e.g. {first!r}): only their local Q/DQ error is shown")
        if not raw:
            notes.append("no QuantizeLinear→DequantizeLinear pair on an activation: activations were not compared")
    else:
        raw = _dynamic_probes(fgraph, qgraph)
    probes, unknown = _sized(raw, _tensor_bytes(fgraph, ffeeds), _tensor_bytes(qgraph, qfeeds))
    plan = _plan(probes, budget, unknown)
    # without a focus, called exactly as before it had one (the tests spy on this call)
    out = (_compare_activations(plan, fgraph, qgraph, ffeeds, qfeeds, tmp) if path is None
           else _compare_activations(plan, fgraph, qgraph, ffeeds, qfeeds, tmp, path))
    if len(plan.groups) > 1 or unknown or plan.oversized:
        said = (f"{len(probes)} activation(s) compared in {len(plan.groups)} group(s) under a {budget / 2**20:.0f} "
                f"MiB bound")
        if unknown:
            said += f"; {unknown} size(s) unknown to shape inference, taken as the largest known tensor"
        if plan.oversized:
            said += f"; {plan.oversized} tensor(s) larger than the bound on their own were compared alone"
        notes.append(said)
    return out, notes


def feeds_from_fixture(inputs: Mapping[str, np.ndarray], batched: bool, count: int = 4, batch: int = 16
                       ) -> list[dict[str, np.ndarray]]:
    """Return up to ``count`` feed dicts from fixture arrays (a ``Fixture.inputs`` and ``FeedPlan.batched``)."""
    samples = int(next(iter(inputs.values())).shape[0])
    if batched:
        starts = range(0, samples, batch)
        return [{k: v[s:s + batch] for k, v in inputs.items()} for s in list(starts)[:count]]
    return [{k: v[i] for k, v in inputs.items()} for i in range(min(count, samples))]
