"""Configs as dataclasses, written to JSON and read back the same way everywhere.

:func:`config_to_dict` turns a dataclass into a JSON-able dict (tuples become lists, dict keys
strings, nested dataclasses dicts, a value whose class has a ``parse`` classmethod its ``str``,
e.g. ``Site(3, "img") -> "img_3"``); :func:`config_from_dict` is the inverse and checks every
value against the field's annotation (a bool is a bool, an int is not a float's stand-in for a
bool, a ``tuple[int, int]`` has two ints, ...) and rejects unknown or missing keys, naming the
file and the key. :func:`write_config` / :func:`read_config` do the same with a file (written
atomically). A field declared with ``field(..., metadata={"config": False})`` (run-time state) is
neither written nor read.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

from difract_ext.util.atomic import atomic_write_json
from difract_ext.util.files import BadFileError, read_json

__all__ = [
    "ConfigError",
    "check_range",
    "check_value",
    "config_from_dict",
    "config_to_dict",
    "read_config",
    "write_config",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict that does not match its dataclass."""


def _is_parsable(tp: Any) -> bool:
    return isinstance(tp, type) and callable(getattr(tp, "parse", None))


def _stored_fields(cls: Any) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("config", True)]


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if _is_parsable(type(value)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in _stored_fields(value)}
    if isinstance(value, Mapping):
        return {_encode_key(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value  # anything else: left to json.dumps


def _encode_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    if _is_parsable(type(key)):
        return str(key)
    raise ConfigError(
        f"cannot write dict key {key!r} ({type(key).__name__}) to JSON; use str or int keys"
    )


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass instance as a JSON-able dict (see the module docstring).

    Raises:
        TypeError: ``config`` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {type(config).__name__}")
    return {f.name: _encode(getattr(config, f.name)) for f in _stored_fields(config)}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _decode(tp: Any, value: Any, where: str) -> Any:
    """``value`` (from JSON) as type ``tp``; ``where`` names the file and key for errors."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            try:
                return _decode(arm, value, where)
            except ConfigError:
                if len(arms) == 1 and isinstance(value, (list, tuple, Mapping)):
                    raise  # list[X] | None: the arm's message names the bad item
        raise ConfigError(
            f"{where}: must be {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: must be null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {value!r}")
        return value
    if _is_parsable(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a {tp.__name__} string, got {value!r}")
        try:
            return tp.parse(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _from_mapping(tp, value, where)
    container = origin or tp
    if container in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {value!r}")
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: must have {len(args)} items, got {len(value)}")
            return tuple(
                _decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))
            )
        item = args[0] if args else Any
        items = [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if container is tuple else items
    if container in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be an object, got {value!r}")
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if kt is int and isinstance(k, str):
                try:
                    key: Any = int(k)
                except ValueError:
                    raise ConfigError(f"{where}: key {k!r} must be an integer") from None
            else:
                key = _decode(kt, k, f"{where} key")
            out[key] = _decode(vt, v, f"{where}[{k!r}]")
        return out
    raise ConfigError(f"{where}: cannot read a value of type {_type_name(tp)} from JSON")


def _from_mapping(cls: type[T], data: Any, source: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: a {cls.__name__} must be a JSON object, got {type(data).__name__}"
        )
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(f"{cls.__name__}'s annotations must be importable at run time: {e}") from e
    fields = {f.name: f for f in _stored_fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {unknown} for {cls.__name__}; known keys: {sorted(fields)}. "
            "Remove them (or the file was written by another version)"
        )
    missing = [
        n
        for n, f in fields.items()
        if n not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {missing} of {cls.__name__}")
    kwargs = {k: _decode(hints[k], v, f"{source}: {k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid {cls.__name__}: {e}") from e


def check_value(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` by the rules of :func:`config_from_dict`
    (ints as floats allowed, nothing else coerced; floats finite).

    Raises:
        ConfigError: naming ``where``.
    """
    return _decode(tp, value, where)


def check_range(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """Refuse a value outside its range, naming it: ``check_range("k", k, integer=True, low=1)``.

    Integers exclude bools; numbers exclude bools, NaN and ±inf. ``low``/``high`` are inclusive
    unless ``low_open``/``high_open``. ``optional`` lets None pass.

    Raises:
        ConfigError: e.g. ``"dead_window must be an integer >= 1, got 0"``.
    """
    if value is None and optional:
        return
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    rule = ("an integer" if integer else "a finite number") + (
        f" {lo}{' and ' if lo and hi else ''}{hi}" if lo or hi else ""
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif integer and not isinstance(value, int):
        ok = False
    elif not math.isfinite(value):
        ok = False
    else:
        ok = (low is None or (value > low if low_open else value >= low)) and (
            high is None or (value < high if high_open else value <= high)
        )
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


def config_from_dict(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from :func:`config_to_dict`'s output (or JSON of it).

    Args:
        cls: the dataclass.
        data: its fields; missing fields with defaults take them.
        source: what the data came from (a file path), for error messages.

    Raises:
        ConfigError: unknown or missing keys, or a value of the wrong type, naming ``source`` and
            the key; or ``cls`` refusing the values.
    """
    return _from_mapping(cls, data, source)


def write_config(path: str | Path, config: Any) -> Path:
    """Atomically write :func:`config_to_dict` of ``config`` to ``path`` as JSON."""
    return atomic_write_json(path, config_to_dict(config))


def read_config(cls: type[T], path: str | Path) -> T:
    """Read a file written by :func:`write_config`.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: the file is not a regular file, too large, not JSON or does not match
            ``cls`` (names the file and key).
    """
    path = Path(path)
    try:
        data = read_json(path, f"{cls.__name__} config")
    except BadFileError as e:
        raise ConfigError(str(e)) from None
    return config_from_dict(cls, data, source=str(path))
