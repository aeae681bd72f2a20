"""settings: the pytest options and their ini twins resolved by ``resolve``, and the CLI's ``settings_from_args``."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pytest_quantgate.settings import (
    DEFAULT_FIXTURES,
    DEFAULT_MAX_FIXTURE_GIB,
    DEFAULT_REGISTRY,
    DEFAULT_SHARD_DIR,
    EpOptions,
    Settings,
    add_gate_args,
    confidence_level,
    default_regen,
    non_negative_int,
    positive_int,
    resolve,
    settings_from_args,
)

GIB = 1 << 30


@pytest.fixture(autouse=True)
def _no_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """The regen default depends on CI; the tests that care set it themselves."""
    monkeypatch.delenv("CI", raising=False)


def _ini(pytester: pytest.Pytester, *lines: str) -> None:
    pytester.makeini("\n".join(["[pytest]", *lines]) + "\n")


def _resolved(pytester: pytest.Pytester, *args: str) -> Settings:
    return resolve(pytester.parseconfig(*args))


def _get(settings: Settings, attribute: str) -> Any:
    value: Any = settings
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


# --- every flag and its ini twin --------------------------------------------------------------------------------

# (ini key = flag dest, Settings attribute, flag value, ini text, value from the flag, value from the ini);
# each option's flag and ini values differ, so a test sees which one won
VALUED: list[tuple[str, str, list[str], str, Any, Any]] = [
    ("quantgate_select", "select", ["a*", "b,c"], "\n  x\n  y, z", ("a*", "b", "c"), ("x", "y", "z")),
    ("quantgate_ep", "eps", ["cuda", "cpu", "cuda"], "\n  OpenVINO, cpu\n  openvino", ("cuda", "cpu"),
     ("openvino", "cpu")),
    ("quantgate_batch_size", "batch_size", ["8"], "16", 8, 16),
    ("quantgate_bootstrap", "bootstrap", ["0"], "50", 0, 50),
    ("quantgate_seed", "seed", ["3"], "4", 3, 4),
    ("quantgate_confidence", "confidence", ["0.9"], "0.99", 0.9, 0.99),
    ("quantgate_decision", "decision", ["point"], "Conservative", "point", "conservative"),
    ("quantgate_regen", "regen", ["all"], "never", "all", "never"),
    ("quantgate_diagnose", "diagnose", ["off"], "ALWAYS", "off", "always"),
    ("quantgate_max_fixture_gib", "max_fixture_bytes", ["2"], "0.5", 2 * GIB, GIB // 2),
    ("quantgate_max_samples", "max_samples", ["0"], "10", 0, 10),
    ("quantgate_save_count", "save_count", ["8"], "100", 8, 100),
    ("quantgate_cuda_device", "ep_options.cuda_device_id", ["1"], "2", 1, 2),
    ("quantgate_openvino_device", "ep_options.openvino_device", ["gpu"], " npu ", "GPU", "NPU"),
    ("quantgate_openvino_precision", "ep_options.openvino_precision", ["fp16"], "accuracy", "FP16", "ACCURACY"),
    ("quantgate_int8_precision", "ep_options.int8_precision", ["EXACT"], "fast", "exact", "fast"),
    ("quantgate_shard", "shard", ["2/3"], " 1/4 ", (2, 3), (1, 4)),
]
FLAGS = [("quantgate", "enabled"), ("quantgate_strict_ep", "strict_ep"), ("quantgate_strict", "strict"),
         ("quantgate_allow_recipes", "allow_recipes"), ("quantgate_cache", "cache"),
         ("quantgate_sequential", "sequential")]
PATHS = [("quantgate_registry", "registry"), ("quantgate_fixtures", "fixtures_dir"), ("quantgate_report", "report"),
         ("quantgate_html", "html"), ("quantgate_save_disagreements", "save_disagreements"),
         ("quantgate_shard_dir", "shard_dir")]


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _argv(key: str, values: list[str]) -> list[str]:
    return [arg for value in values for arg in (_flag(key), value)]


def test_every_quantgate_option_has_an_ini_twin_and_a_row_here(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig()
    dests = {option.dest for option in config._parser.getgroup("quantgate").options}
    for dest in dests:
        config.getini(dest)  # raises ValueError for an ini key that was never added
    covered = {row[0] for row in VALUED} | {key for key, _ in FLAGS} | {key for key, _ in PATHS}
    assert dests == covered


@pytest.mark.parametrize(("key", "attribute", "flag", "ini", "from_flag", "from_ini"), VALUED,
                         ids=[row[0] for row in VALUED])
def test_the_ini_twin_sets_the_field_and_the_flag_wins_over_it(
        pytester: pytest.Pytester, key: str, attribute: str, flag: list[str], ini: str, from_flag: Any,
        from_ini: Any) -> None:
    assert _get(_resolved(pytester, *_argv(key, flag)), attribute) == from_flag
    _ini(pytester, f"{key} = {ini}")
    assert _get(_resolved(pytester), attribute) == from_ini
    assert _get(_resolved(pytester, *_argv(key, flag)), attribute) == from_flag


@pytest.mark.parametrize(("key", "attribute"), FLAGS, ids=[row[0] for row in FLAGS])
def test_a_boolean_is_on_from_the_flag_or_the_ini(pytester: pytest.Pytester, key: str, attribute: str) -> None:
    assert _get(_resolved(pytester), attribute) is False
    assert _get(_resolved(pytester, _flag(key)), attribute) is True
    _ini(pytester, f"{key} = false")
    assert _get(_resolved(pytester), attribute) is False
    _ini(pytester, f"{key} = true")
    assert _get(_resolved(pytester), attribute) is True


@pytest.mark.parametrize(("key", "attribute"), PATHS, ids=[row[0] for row in PATHS])
def test_flag_paths_are_relative_to_the_invocation_folder_ini_paths_to_the_ini_file(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, key: str, attribute: str) -> None:
    conf, work = pytester.mkdir("conf"), pytester.mkdir("work")
    (conf / "pytest.ini").write_text(f"[pytest]\n{key} = from-ini/x\n")
    monkeypatch.chdir(work)
    # three different folders: the rootdir, the ini file's and the invocation's
    ini = ("-c", str(conf / "pytest.ini"), f"--rootdir={pytester.path}")
    assert _get(_resolved(pytester, *ini), attribute) == (conf / "from-ini" / "x").resolve()
    flagged = _resolved(pytester, *ini, _flag(key), "from-flag/y")
    assert _get(flagged, attribute) == (work / "from-flag" / "y").resolve()


def test_defaults_without_flags_or_ini(pytester: pytest.Pytester) -> None:
    got = _resolved(pytester)
    root = pytester.path.resolve()
    assert got == Settings(registry=root / DEFAULT_REGISTRY, fixtures_dir=root / DEFAULT_FIXTURES,
                           shard_dir=root / DEFAULT_SHARD_DIR)
    assert got.eps == ("auto",) and got.regen == "missing" and got.threads is None
    assert got.max_fixture_bytes == int(DEFAULT_MAX_FIXTURE_GIB * GIB)
    assert got.ep_options == EpOptions()


def test_the_default_registry_is_looked_for_under_the_rootdir_then_the_invocation_folder(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    work = pytester.mkdir("work")
    monkeypatch.chdir(work)
    rootdir = f"--rootdir={pytester.path}"
    assert _resolved(pytester, rootdir).registry == (pytester.path / DEFAULT_REGISTRY).resolve()  # neither: rootdir
    (work / "model").mkdir()
    (work / DEFAULT_REGISTRY).write_text("{}")
    assert _resolved(pytester, rootdir).registry == (work / DEFAULT_REGISTRY).resolve()
    (pytester.path / "model").mkdir()
    (pytester.path / DEFAULT_REGISTRY).write_text("{}")
    assert _resolved(pytester, rootdir).registry == (pytester.path / DEFAULT_REGISTRY).resolve()


@pytest.mark.parametrize(("ci", "regen"), [("true", "never"), ("1", "never"), (" YES ", "never"), ("false", "missing"),
                                           ("0", "missing"), ("", "missing")])
def test_ci_turns_the_regen_default_to_never(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str,
                                             regen: str) -> None:
    monkeypatch.setenv("CI", ci)
    assert default_regen() == regen
    assert _resolved(pytester).regen == regen
    assert _resolved(pytester, "--quantgate-regen", "missing").regen == "missing"  # an explicit choice stands


def test_an_empty_ini_value_counts_as_unset(pytester: pytest.Pytester) -> None:
    _ini(pytester, "quantgate_seed =", "quantgate_decision =")
    got = _resolved(pytester)
    assert (got.seed, got.decision) == (0, "point")


def test_xdist_workers_share_the_cores(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    config = pytester.parseconfig()
    config.workerinput = {"workercount": 4}  # type: ignore[attr-defined]
    assert resolve(config).threads == 4
    config.workerinput = {"workercount": 32}  # type: ignore[attr-defined]
    assert resolve(config).threads == 1
    config.workerinput = {"workerid": "gw0"}  # type: ignore[attr-defined]
    assert resolve(config).threads is None


# --- bad values: a UsageError naming the option (flag or ini) and what is allowed ----------------------------------

BAD_INI = [
    ("quantgate_batch_size", "0", "an integer >= 1"),
    ("quantgate_batch_size", "eight", "an integer >= 1"),
    ("quantgate_bootstrap", "-1", "an integer >= 0"),
    ("quantgate_seed", "1.5", "an integer >= 0"),
    ("quantgate_max_samples", "-5", "an integer >= 0"),
    ("quantgate_cuda_device", "gpu0", "an integer >= 0"),
    ("quantgate_confidence", "1.5", "a number strictly between 0.5 and 1"),
    ("quantgate_confidence", "0.5", "a number strictly between 0.5 and 1"),
    ("quantgate_decision", "maybe", "point, conservative, three-way"),
    ("quantgate_regen", "sometimes", "missing, all, never"),
    ("quantgate_diagnose", "loud", "auto, off, always"),
    ("quantgate_openvino_precision", "int4", "FP32, FP16, ACCURACY"),
    ("quantgate_int8_precision", "approx", "exact, fast"),
    ("quantgate_max_fixture_gib", "0", "a positive number of GiB"),
    ("quantgate_max_fixture_gib", "-1", "a positive number of GiB"),
    ("quantgate_max_fixture_gib", "nan", "a positive number of GiB"),
    ("quantgate_max_fixture_gib", "inf", "a positive number of GiB"),
    ("quantgate_max_fixture_gib", "lots", "a positive number of GiB"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_INI, ids=[f"{k}={v}" for k, v, _ in BAD_INI])
def test_a_bad_ini_value_is_a_usage_error_naming_the_key_and_what_is_allowed(
        pytester: pytest.Pytester, key: str, value: str, allowed: str) -> None:
    _ini(pytester, f"{key} = {value}")
    with pytest.raises(pytest.UsageError) as raised:
        _resolved(pytester)
    assert str(raised.value) == f"quantgate: {key} (ini) = {value!r} is invalid; allowed: {allowed}"


def test_a_bad_ep_in_an_ini_list_names_that_item(pytester: pytest.Pytester) -> None:
    _ini(pytester, "quantgate_ep = cpu, tpu")
    with pytest.raises(pytest.UsageError, match=r"quantgate_ep \(ini\) = 'tpu' is invalid; allowed: cpu, cuda, "
                                                r"openvino, auto$"):
        _resolved(pytester)


@pytest.mark.parametrize("value", ["0", "nan", "-inf", "many"])
def test_a_bad_gib_flag_names_the_flag(pytester: pytest.Pytester, value: str) -> None:
    # the one valued flag without an argparse type: checked when resolved, and named as typed
    with pytest.raises(pytest.UsageError) as raised:
        _resolved(pytester, f"--quantgate-max-fixture-gib={value}")
    assert str(raised.value) == (f"quantgate: --quantgate-max-fixture-gib = {value!r} is invalid; allowed: a "
                                 f"positive number of GiB")


@pytest.mark.parametrize(("flag", "value", "said"), [
    ("--quantgate-batch-size", "0", "'0' must be >= 1"),
    ("--quantgate-seed", "x", "'x' is not an integer"),
    ("--quantgate-confidence", "1", "'1' must lie strictly between 0.5 and 1"),
    ("--quantgate-ep", "tpu", "invalid choice: 'tpu'"),
    ("--quantgate-int8-precision", "approx", "invalid choice: 'approx'"),
])
def test_a_bad_flag_is_refused_while_parsing(pytester: pytest.Pytester, flag: str, value: str, said: str) -> None:
    with pytest.raises(pytest.UsageError) as raised:
        pytester.parseconfig(flag, value)
    assert f"argument {flag}: {said}" in str(raised.value)


# --- the command line: add_gate_args + settings_from_args ----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    """Return the parser ``quantgate measure`` builds: registry arguments, then the shared gate options."""
    parser = argparse.ArgumentParser(prog="quantgate-test")
    parser.add_argument("registry", nargs="?", default=DEFAULT_REGISTRY, type=Path)
    parser.add_argument("--fixtures", type=Path, default=Path(DEFAULT_FIXTURES))
    parser.add_argument("--id", dest="ids", action="append", default=None)
    add_gate_args(parser)
    return parser


def _from_args(*argv: str) -> Settings:
    return settings_from_args(_parser().parse_args(list(argv)))


def test_cli_defaults_are_the_plugins_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    got = _from_args()
    assert got == replace(Settings(), enabled=True, registry=(tmp_path / DEFAULT_REGISTRY).resolve(),
                          fixtures_dir=(tmp_path / DEFAULT_FIXTURES).resolve(),
                          shard_dir=(tmp_path / DEFAULT_SHARD_DIR).resolve())
    monkeypatch.setenv("CI", "true")
    assert _from_args().regen == "never"
    assert _from_args("--regen", "all").regen == "all"


def test_cli_values_reach_the_settings(tmp_path: Path) -> None:
    got = _from_args(str(tmp_path / "r.json"), "--fixtures", str(tmp_path / "fx"), "--id", "a*", "--id", "b",
                     "--ep", "cuda", "--ep", "cpu", "--ep", "cuda", "--strict", "--strict-ep", "--batch-size", "7",
                     "--bootstrap", "0", "--seed", "9", "--confidence", "0.9", "--decision", "conservative",
                     "--regen", "never", "--allow-recipes", "--diagnose", "always", "--max-fixture-gib", "0.25",
                     "--max-samples", "0", "--cuda-device", "3", "--openvino-device", "gpu.1",
                     "--openvino-precision", "FP16", "--int8-precision", "fast", "--save-disagreements",
                     str(tmp_path / "worst"), "--save-count", "16", "--shard", "2/5", "--shard-dir",
                     str(tmp_path / "states"))
    assert got == Settings(
        enabled=True, registry=(tmp_path / "r.json").resolve(), fixtures_dir=(tmp_path / "fx").resolve(),
        select=("a*", "b"),
        eps=("cuda", "cpu"), strict_ep=True, strict=True, batch_size=7, bootstrap=0, seed=9, confidence=0.9,
        decision="conservative", regen="never", allow_recipes=True, diagnose="always", max_fixture_bytes=GIB // 4,
        max_samples=0, ep_options=EpOptions(3, "GPU.1", "FP16", "fast"), save_disagreements=(tmp_path / "worst"),
        save_count=16, shard=(2, 5), shard_dir=(tmp_path / "states").resolve())


@pytest.mark.parametrize(("argv", "said"), [
    (["--batch-size", "0"], "argument --batch-size: '0' must be >= 1"),
    (["--bootstrap", "many"], "argument --bootstrap: 'many' is not an integer"),
    (["--seed", "-1"], "argument --seed: '-1' must be >= 0"),
    (["--confidence", "0.5"], "argument --confidence: '0.5' must lie strictly between 0.5 and 1"),
    (["--confidence", "high"], "argument --confidence: 'high' is not a number"),
    (["--ep", "tpu"], "argument --ep: invalid choice: 'tpu'"),
    (["--regen", "sometimes"], "argument --regen: invalid choice: 'sometimes'"),
    (["--shard", "3/2"], "argument --shard: '3/2' is not K/N with 1 <= K <= N"),
    (["--shard", "two"], "argument --shard: 'two' is not K/N with 1 <= K <= N"),
    (["--json", "{tmp}/no-such-folder/x.json"], "argument --json: "),
])
def test_cli_refuses_bad_values_while_parsing(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str],
                                              said: str) -> None:
    with pytest.raises(SystemExit) as raised:
        _parser().parse_args([arg.format(tmp=tmp_path) for arg in argv])
    assert raised.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_cli_refuses_a_cap_that_is_not_a_positive_number_of_gib(value: str) -> None:
    try:
        ns = _parser().parse_args(["--max-fixture-gib", value])
    except SystemExit:
        return
    settings = settings_from_args(ns)
    assert 0 < settings.max_fixture_bytes < (1 << 62), f"--max-fixture-gib {value} accepted"


def test_the_validators_directly() -> None:
    assert positive_int("1") == 1 and non_negative_int("0") == 0 and confidence_level("0.999") == 0.999
    for parse, text, said in ((positive_int, "0", "'0' must be >= 1"), (non_negative_int, "-2", "'-2' must be >= 0"),
                              (positive_int, "1.0", "'1.0' is not an integer"),
                              (confidence_level, "1", "'1' must lie strictly between 0.5 and 1"),
                              (confidence_level, "nan", "'nan' must lie strictly between 0.5 and 1")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{said}$"):
            parse(text)
