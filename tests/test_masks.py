"""quant_outputs mask / mask_invert: only the positions that matter count, in every statistic of the output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import modelkit
import numpy as np
import pytest

from pytest_quantgate.engine.comparison import Collector, CompareOptions, compare, plan_outputs
from pytest_quantgate.errors import FixtureError, RegistryError
from pytest_quantgate.io.soak import Fixture, TensorSpec

N, T, V = 96, 12, 40


def _entry(**extra: Any) -> Any:
    return modelkit.registry_entry(id="seq", quant_channel_axis=None, **extra)


def _sequences(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return token ids, the attention mask (1 = token), fp32 logits and int8 logits that are garbage on padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, size=N)
    valid = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    tokens = rng.integers(1, 500, size=(N, T)) * valid
    fp32 = rng.normal(size=(N, T, V)).astype(np.float32)
    int8 = (fp32 + rng.normal(scale=0.002, size=fp32.shape)).astype(np.float32)
    pad = valid[..., None] == 0
    int8 = np.where(pad, rng.normal(scale=5.0, size=fp32.shape), int8).astype(np.float32)  # padding: anything
    return tokens, valid, fp32, int8


def _compare(entry: Any, arrays: dict[str, np.ndarray], fp32: np.ndarray, int8: np.ndarray) -> Any:
    fixture = Fixture(Path("soak.npz"), "0", arrays, None)
    inputs = (TensorSpec("tokens", "tensor(int64)", ("N", T)),)
    outputs = (TensorSpec("logits", "tensor(float)", ("N", T, V)),)
    return compare(entry, "cpu", fixture, inputs, outputs, {"logits": fp32}, {"logits": int8},
                   CompareOptions(bootstrap=200))


def _reference(valid: np.ndarray, fp32: np.ndarray, int8: np.ndarray) -> tuple[float, float]:
    """Return (PLCC, argmax flip share) over the valid positions, from scratch with numpy."""
    keep = valid.astype(bool)
    a = fp32[keep].astype(np.float64).ravel()
    b = int8[keep].astype(np.float64).ravel()
    plcc = float(np.corrcoef(a, b)[0, 1])
    flips = float(np.mean(np.argmax(fp32, axis=2)[keep] != np.argmax(int8, axis=2)[keep]))
    return plcc, flips


def test_padding_fails_the_output_until_a_mask_declares_it() -> None:
    tokens, valid, fp32, int8 = _sequences()
    arrays = {"tokens": tokens, "attention_mask": valid}
    plain = _compare(_entry(quant_argmax_axis=2), arrays, fp32, int8)
    assert plain.verdict == "FAIL"
    masked = _compare(_entry(quant_argmax_axis=2, quant_outputs={"logits": {"mask": "attention_mask"}}), arrays,
                      fp32, int8)
    assert masked.verdict == "PASS", masked.reason
    (out,) = masked.outputs
    plcc, flips = _reference(valid, fp32, int8)
    assert out.vs_fp32.plcc == pytest.approx(plcc, rel=1e-12)
    assert out.vs_fp32.n == int(valid.sum()) * V
    assert out.labels is not None and out.labels.flip_rate == pytest.approx(flips, abs=1e-15)
    assert out.mask == "attention_mask"
    # the largest error is the largest over counted positions only
    assert out.vs_fp32.max_abs == pytest.approx(float(np.abs(int8 - fp32)[valid.astype(bool)].max()), rel=1e-7)


def test_an_inverted_padding_mask_gives_the_same_numbers() -> None:
    tokens, valid, fp32, int8 = _sequences(1)
    arrays = {"tokens": tokens, "attention_mask": valid, "key_padding_mask": valid == 0}
    direct = _compare(_entry(quant_argmax_axis=2, quant_outputs={"logits": {"mask": "attention_mask"}}), arrays,
                      fp32, int8)
    inverted = _compare(_entry(quant_argmax_axis=2, quant_outputs={"logits": {
        "mask": "key_padding_mask", "mask_invert": True}}), arrays, fp32, int8)
    assert direct.drop == inverted.drop and direct.interval == inverted.interval
    assert direct.outputs[0].labels == inverted.outputs[0].labels


def test_a_mask_counts_the_same_in_chunks_and_in_hashed_blocks() -> None:
    tokens, valid, fp32, int8 = _sequences(2)
    entry = _entry(quant_argmax_axis=2, quant_outputs={"logits": {"mask": "attention_mask"}})
    arrays = {"tokens": tokens, "attention_mask": valid}
    fixture = Fixture(Path("soak.npz"), "0", arrays, None)
    plans = plan_outputs(entry, fixture, (TensorSpec("tokens", "tensor(int64)", ("N", T)),),
                         (TensorSpec("logits", "tensor(float)", ("N", T, V)),))
    whole = _compare(entry, arrays, fp32, int8)
    for cap in (None, 16):
        collector = Collector(entry, plans, N, 0, "soak.npz", max_units=cap)
        for lo in range(0, N, 7):
            hi = min(N, lo + 7)
            collector.add(lo, {k: v[lo:hi] for k, v in arrays.items()}, None, {"logits": fp32[lo:hi]},
                          {"logits": int8[lo:hi]})
        result = collector.decide("cpu", CompareOptions(bootstrap=200))
        assert result.outputs[0].vs_fp32.plcc == pytest.approx(whole.outputs[0].vs_fp32.plcc, rel=1e-12)
        assert result.outputs[0].labels is not None and whole.outputs[0].labels is not None
        assert result.outputs[0].labels.flip_rate == whole.outputs[0].labels.flip_rate


def test_an_unknown_mask_is_a_usage_error_naming_the_arrays() -> None:
    tokens, valid, fp32, int8 = _sequences()
    with pytest.raises(RegistryError, match=r"entry 'seq' field 'quant_outputs' output 'logits' key 'mask': "
                                            r"'attn' is not an array of the soak fixture \(arrays: "
                                            r"'attention_mask', 'tokens'\)"):
        _compare(_entry(quant_outputs={"logits": {"mask": "attn"}}), {"tokens": tokens, "attention_mask": valid},
                 fp32, int8)


def test_a_mask_of_the_wrong_shape_names_both_shapes() -> None:
    tokens, valid, fp32, int8 = _sequences()
    with pytest.raises(FixtureError, match=r"mask 'attention_mask' has shape \(11,\) per sample, the output "
                                           r"\(12, 40\)"):
        _compare(_entry(quant_outputs={"logits": {"mask": "attention_mask"}}),
                 {"tokens": tokens, "attention_mask": valid[:, :11]}, fp32, int8)


@pytest.mark.parametrize(("rules", "message"), [
    ({"mask_invert": True}, "'mask_invert' needs 'mask'"),
    ({"threshold_channels": "1:"}, "'threshold_channels' needs 'threshold'"),
    ({"budget_cosine": 0.1}, "'budget_cosine' needs 'embedding_axis'"),
    ({"budget_label_flip": 0.1}, "'budget_label_flip' needs an argmax view"),
    ({"threshold": 0.5, "embedding_axis": 2}, "'threshold' and 'embedding_axis' are two ways"),
])
def test_keys_that_make_no_sense_together_are_usage_errors(rules: dict[str, Any], message: str) -> None:
    tokens, valid, fp32, int8 = _sequences()
    with pytest.raises(RegistryError, match=message):
        _compare(_entry(quant_outputs={"logits": rules}), {"tokens": tokens, "attention_mask": valid}, fp32, int8)


def test_a_label_output_refuses_float_output_keys() -> None:
    entry = _entry(quant_outputs={"ids": {"threshold": 0.5}})
    fixture = Fixture(Path("soak.npz"), "0", {"tokens": np.zeros((4, T), np.int64)}, None)
    with pytest.raises(RegistryError, match=r"output 'ids' \(int64\[N,12\], compared as labels\): 'threshold' "
                                            r"apply to float outputs"):
        plan_outputs(entry, fixture, (), (TensorSpec("ids", "tensor(int64)", ("N", T)),))
