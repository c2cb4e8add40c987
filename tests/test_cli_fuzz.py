"""Property tests over the ``difract`` command's argument space (issue 17: CLI-argument fuzzing).

Every numeric option of every subcommand goes through a checked argument type
(:mod:`difract_ext.cli.argtypes`); hypothesis feeds each of them arbitrary text, integers and
floats (NaN, ±inf, huge, negative) and checks the answer against an independent oracle of the
option's rule: the value is accepted exactly when it parses and lies in range, and a refusal is
a one-line ``ArgumentTypeError`` that states the rule. A whole-parser pass checks that a refused
value exits with status 2 and one error line naming the option.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difract_ext.cli import argtypes
from difract_ext.cli.main import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


SUBCOMMANDS = _subparsers(build_parser())
OPTIONS: list[tuple[str, str, Any]] = [
    (name, action.option_strings[-1], action.type)
    for name, sub in SUBCOMMANDS.items()
    for action in sub._actions
    if action.option_strings and action.type is not None
]
CHECKED = [o for o in OPTIONS if hasattr(o[2], "rule")]


def test_every_numeric_option_is_checked() -> None:
    """No option parses a number with a bare ``int``/``float`` (which takes 0, -5, nan, inf)."""
    bare = [f"{cmd} {opt}" for cmd, opt, kind in OPTIONS if kind in (int, float)]
    assert not bare, f"numeric options without a checked type: {bare}"
    assert len(CHECKED) >= 30  # the suite really covers the command's numeric options


def _oracle(rule: dict[str, Any], text: str) -> Any:
    """The value ``text`` must give under ``rule``, or None if it must be refused."""
    try:
        value = int(text) if rule["integer"] else float(text)
    except ValueError:
        return None
    if not rule["integer"] and not math.isfinite(value):
        return None
    low, high = rule.get("low"), rule.get("high")
    if low is not None and (value <= low if rule.get("low_open") else value < low):
        return None
    if high is not None and (value >= high if rule.get("high_open") else value > high):
        return None
    return value


TEXT = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-0", "1", "-1", "nan", "inf", "-inf", "1e400", "1.5", "0x10", "", " 3"]),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option=st.sampled_from(CHECKED), text=TEXT)
def test_checked_types_accept_exactly_their_range(option, text: str) -> None:
    command, flag, convert = option
    expected = _oracle(convert.rule, text)
    if expected is None:
        with pytest.raises(argparse.ArgumentTypeError) as err:
            convert(text)
        message = str(err.value)
        assert "\n" not in message and message.startswith("must be"), (command, flag, message)
    else:
        value = convert(text)
        assert value == expected and type(value) is type(expected), (command, flag, text)


def _minimal_argv(command: str, skip: str | None = None) -> list[str]:
    """Positional arguments and required options of ``command`` filled with plausible text."""
    sub = SUBCOMMANDS[command]
    argv: list[str] = [command]

    def plausible(action: argparse.Action) -> str:
        if hasattr(action.type, "rule"):
            return "1"
        if action.choices:
            return str(next(iter(action.choices)))
        return "x0:red@left" if "target" in action.dest else "x"

    for action in sub._actions:
        if not action.option_strings and action.dest != "help":
            argv.append(plausible(action))
        elif action.required and action.option_strings[-1] != skip:
            argv += [action.option_strings[-1], plausible(action)]
    return argv


@settings(max_examples=150, deadline=None)
@given(option=st.sampled_from(CHECKED), text=TEXT)
def test_refused_values_exit_2_with_one_line_naming_the_option(option, text: str) -> None:
    command, flag, convert = option
    if _oracle(convert.rule, text) is not None:
        return
    argv = [*_minimal_argv(command), f"{flag}={text}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    assert done.value.code == 2
    last = err.getvalue().strip().splitlines()[-1]
    assert last.startswith(f"difract {command}: error: argument {flag}"), last


@pytest.mark.parametrize("text", ["-1", str(2**63), "1.0"])
def test_seeds_are_refused_outside_the_generator_range(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be an integer"):
        argtypes.seed(text)
    assert argtypes.seed(str(2**63 - 1)) == 2**63 - 1


OUT_FOLDERS = [
    (name, action.option_strings[-1])
    for name, sub in SUBCOMMANDS.items()
    for action in sub._actions
    if action.type is argtypes.output_folder
]


def test_every_output_folder_option_is_checked() -> None:
    assert {name for name, _ in OUT_FOLDERS} >= {
        "harvest",
        "train",
        "eval",
        "attribute",
        "dashboards",
        "steer",
        "demo",
    }


@pytest.mark.parametrize(("command", "flag"), OUT_FOLDERS)
@pytest.mark.parametrize("case", ["file", "under a file", "not writable"])
def test_bad_output_folder_is_refused_before_anything_runs(
    tmp_path, monkeypatch, command: str, flag: str, case: str
) -> None:
    """An existing file, a path under a file, an unwritable parent (os.access mocked: tests may
    run as root) used to fail after the work, with a bare OSError."""
    afile = tmp_path / "a_file"
    afile.write_text("x")
    out = {"file": afile, "under a file": afile / "sub", "not writable": tmp_path / "new"}[case]
    if case == "not writable":
        monkeypatch.setattr("os.access", lambda path, mode: False)
    expected = {
        "file": "exists and is not a folder",
        "under a file": "is a file, not a folder",
        "not writable": "is not writable",
    }[case]
    argv = [*_minimal_argv(command, skip=flag), f"{flag}={out}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    assert done.value.code == 2
    last = err.getvalue().strip().splitlines()[-1]
    assert last.startswith(f"difract {command}: error: argument {flag}: {out}") and expected in last
    monkeypatch.undo()
    assert argtypes.output_folder(str(tmp_path / "fresh" / "dir")) == str(
        tmp_path / "fresh" / "dir"
    )
