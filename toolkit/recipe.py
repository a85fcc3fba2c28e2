"""Recipe files and overrides: strict YAML reading, ``section.key=value`` overrides, the
type-checked construction of the config dataclasses (which :mod:`toolkit.config` defines), and the
value checks they share with the command line (:func:`check_writable_dir`).

Strict means that every mistake is one line of :class:`ConfigError` naming the file, line or key,
never a traceback and never a silent choice: a key given twice in one mapping (PyYAML would keep
the last one), a file that is not UTF-8 text or not a mapping, a YAML syntax error, and a NaN or
infinite number (no recipe key means anything with one; ``max_grad_norm: null`` disables clipping).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the offending key."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at ``path`` as nested dicts (empty for an empty file)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"recipe {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"recipe {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")  # a BOM (Windows editors) is harmless
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"recipe {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from exc
    try:
        loaded = _load_strict(text, path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(exc)}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


def _load_strict(text: str, path: Path) -> Any:
    """``yaml.safe_load``, refusing duplicate keys: the tree is checked between composing and constructing."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, "", path, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, prefix: str, path: Path, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked (and YAML allows recursive ones)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                _check_duplicate_keys(value_node, prefix, path, seen)
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(
                    f"recipe {path}: duplicate key {prefix}{key} on line {line} (first on line {first_line[key]}); "
                    "keep one"
                )
            first_line[key] = line
            _check_duplicate_keys(value_node, f"{prefix}{key}.", path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{prefix.rstrip('.')}[{index}].", path, seen)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, then what."""
    if isinstance(exc, yaml.MarkedYAMLError):
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        mark = exc.problem_mark or exc.context_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what
    return " ".join(str(exc).split())


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=value`` override in place; the value is parsed as YAML (numbers, bools, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be dotted, like training.learning_rate")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Build ``cls`` from a mapping, checking every key and type; ``prefix`` names the section in errors."""
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = build_dataclass(hint_type, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, hint_type, f"{prefix}{key}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint, converting only what YAML cannot express."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        lists = [arg for arg in args if typing.get_origin(arg) is list]
        if isinstance(value, list) and len(lists) == 1:  # a list is meant as the list form: its own errors
            return coerce(value, lists[0], key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}: {value!r} must be {_type_name(hint)}")
    if origin is list:
        if isinstance(value, str):  # `lora.target_modules=q_proj,v_proj` on the command line
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is Literal:
        if value is False and "no" in args:
            value = "no"  # YAML 1.1 reads an unquoted `no` (`training.mixed_precision=no`) as false
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):  # an entry of a list of sections (evaluation.guard)
        return build_dataclass(hint, value, prefix=f"{key}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        return _finite_float(value, key)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(hint)}")  # pragma: no cover - programming error


def _finite_float(value: Any, key: str) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        # PyYAML reads "1e-5" (no dot) as a string; accept any float literal.
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        raise ConfigError(f"{key} must be a number, got {value!r}")
    # NaN fails every comparison, so a range check written as `if x <= 0: refuse` lets it through:
    # refuse it here, once for every float key (and infinity with it: no key means "unbounded" by it).
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def _type_name(hint: Any) -> str:
    """``true, false or 'auto'`` for ``bool | Literal["auto"]``; the class name otherwise."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(repr, args))
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("true or false" if a is bool else _type_name(a) for a in args if a is not type(None))
    return getattr(hint, "__name__", str(hint))


def check_writable_dir(key: str, value: str) -> None:
    """Refuse a directory that this user cannot create or write into, at load time: a run would
    otherwise find out at its first write, after the model and the data have loaded."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {value} is a file, not a directory")
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{key}: {value} is a broken symbolic link")
    existing = path
    while not existing.exists():  # `exists` is False below a file too: the walk stops at that file
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {value} lies under {existing}, which is a file")
    # os.access asks the kernel with this process's ids, so another user's directory and a read-only
    # filesystem are refused (root passes permission bits, not EROFS); creating entries needs "x" too.
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {value} is not writable ({existing} does not let this user create files)")
