"""Typed configuration sections: strict dict <-> dataclass conversion and the checks the
sections share.

Each component declares its config section as a ``@dataclass(kw_only=True)`` next to its
option lists (``fastlt.models.config``, ``fastlt.data.config``, ``fastlt.method.config``,
``fastlt.training.schedule``, ``fastlt.training.engine``, ``fastlt.pipelines.spec``); ``fastlt.config.loader``
assembles them. This module turns nested dicts (parsed YAML, ``--set`` overrides) into those
dataclasses:

* unknown keys raise :class:`~fastlt.errors.ConfigError` naming the key and the closest
  valid keys (a misspelt ``l_d_wram`` would otherwise change the method without a word);
* values are checked against the field annotations (``int``, ``float``, ``list[int]``,
  ``int | None``, ...), naming the key, the value and the expected type; a nan or inf float
  is refused anywhere (``.nan`` is valid YAML, and would train on silently);
* :func:`load_yaml` reads YAML that refuses a key given twice in one mapping (PyYAML keeps
  the last one without a word, so a section written twice loses the first), and bounds what
  aliases can do: a recursive alias is refused, and so is a document that expands to more
  than :data:`MAX_YAML_VALUES` values (an "alias bomb" of a few lines expands to billions);
* a section given as nothing (a bare ``optim:`` line, ``--set run=null``) is refused: it would
  silently reset the whole section to its defaults; a string holds no NUL and no unpaired
  surrogate; a float fits float32 and an int fits int64 (they become tensors);
* ``one_of`` / ``positive`` are the value checks every section's ``__post_init__`` uses.

Nothing here imports torch: loading a config is cheap and works without a GPU stack.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any

import yaml

from fastlt.errors import ConfigError, DataError

__all__ = ["MAX_YAML_VALUES", "Problems", "build_section", "check_path", "field_types", "flat_keys", "load_yaml", "one_of",
           "positive", "set_dotted", "unknown_key"]

#: Values (scalars and collections, aliases counted each time they are used) a YAML document may
#: expand to; a recipe holds a few hundred.
MAX_YAML_VALUES = 100_000
_MAX_DEPTH = 64
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_TINY = 1.1754943508222875e-38
_INT64 = (-2**63, 2**63 - 1)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a mapping with a key given twice is an error."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges are not duplicates
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"line {line}: key {key!r} is given twice in the same mapping (first on line "
                                  f"{seen[key]}); YAML would keep only the second. Merge the two into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """YAML ``text`` (from ``source``, named in errors) with SafeLoader's types; duplicate keys,
    syntax errors, impossible values (a 30th of February), recursive aliases and documents that
    expand beyond :data:`MAX_YAML_VALUES` values are one-line ConfigErrors."""
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"{source}: not valid YAML: {where}{' '.join(what.split())}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply (or a recursive '<<' merge)") from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a timestamp of a day that does not exist
        raise ConfigError(f"{source}: not valid YAML: a value cannot be read ({type(e).__name__}: {e})") from None
    _check_expansion(tree, source)
    return tree


def _check_expansion(tree, source: str) -> None:
    """ConfigError if ``tree`` (parsed YAML, whose aliases are shared objects) contains itself or
    expands to more than MAX_YAML_VALUES values. Stops counting at the limit: a bomb costs no
    more than a large recipe."""
    count = 0
    stack: list = [(tree, 0, frozenset())]
    while stack:
        node, depth, above = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: the YAML expands to more than {MAX_YAML_VALUES} values (aliases "
                              "counted each time they are used, as in an 'alias bomb'); a recipe needs a few "
                              "hundred: write the values out")
        if isinstance(node, (dict, list, tuple)):
            if id(node) in above:
                raise ConfigError(f"{source}: a YAML alias refers to the collection that contains it (a recursive "
                                  "alias such as '&a [*a]'); write the value out")
            if depth >= _MAX_DEPTH:
                raise ConfigError(f"{source}: the YAML is nested more than {_MAX_DEPTH} levels deep")
            inner = above | {id(node)}
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, depth + 1, inner) for child in children)


def _finite(key: str, value: float) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number; got {value!r}")
    return value


def _float32(key: str, value) -> float:
    """A finite float that stays finite as float32 (the lr, the temperatures, the loss weights
    become float32 tensors: 1e39 would turn inf after setup, not at the config)."""
    try:
        out = _finite(key, float(value))
    except OverflowError:  # an int too large for a float
        out = math.inf
    if abs(out) > _FLOAT32_MAX:
        raise ConfigError(f"{key}: {value!r} overflows float32 (largest {_FLOAT32_MAX:.4g}), in which it is used; "
                          "give a smaller value")
    if out != 0 and abs(out) < _FLOAT32_TINY:  # a denormal or 0 in float32; 1/x (a temperature) overflows
        raise ConfigError(f"{key}: {value!r} underflows float32 (smallest normal {_FLOAT32_TINY:.4g}), in which it "
                          "is used; give 0 or a larger value")
    return out


def _plain_text(key: str, value: str) -> str:
    """A string without a NUL and without unpaired surrogates (no file name or log line can hold them)."""
    if "\x00" in value:
        raise ConfigError(f"{key}: {value!r} contains a NUL character (\\x00); remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{key}: {value!r} contains {value[e.start:e.end]!r}, an unpaired surrogate that no "
                          "file can store; write the character itself (UTF-8)") from None
    return value


def check_path(key: str, value: str) -> None:
    """ConfigError unless the path text ``value`` of config key ``key`` can name a file at all
    (no NUL, no unpaired surrogate, no part over the file system's name length)."""
    from fastlt.paths import path_problem

    if value and (problem := path_problem(value)) is not None:
        raise ConfigError(f"{key}: {value[:80]!r}{'...' if len(value) > 80 else ''} cannot be a path: {problem}")


def _check_finite_tree(key: str, value) -> None:
    """Free-form values (dict and Any fields, e.g. deepspeed.extra) hold no nan/inf either."""
    if isinstance(value, float):
        _finite(key, value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite_tree(f"{key}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite_tree(f"{key}[{i}]", v)


def one_of(key: str, value, allowed) -> None:
    """Raise ConfigError unless ``value`` is in ``allowed`` (with the closest allowed value)."""
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}{hint}")


def positive(key: str, value, *, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` > 0 (or >= 0 with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def field_types(cls) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


def flat_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a section tree (sections and leaves), e.g. 'optim.lr'."""
    keys = []
    for name, tp in field_types(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(flat_keys(tp, key + "."))
    return keys


def unknown_key(root, key: str, valid_here: list[str]) -> ConfigError:
    """The error for an unknown dotted ``key``, suggesting the most likely intended keys."""
    all_keys = flat_keys(root)
    leaf = key.rsplit(".", 1)[-1]
    # Most likely first: the same name in another section ('optim.l_d_warm' -> 'method.l_d_warm'),
    # then a near spelling of the whole key, then a near spelling of the last part.
    same_leaf = [k for k in all_keys if k.rsplit(".", 1)[-1] == leaf]
    near_key = difflib.get_close_matches(key, all_keys, n=3, cutoff=0.8)
    near_leaves = set(difflib.get_close_matches(leaf, {k.rsplit(".", 1)[-1] for k in all_keys}, n=3, cutoff=0.7))
    near_leaf = [k for k in all_keys if k.rsplit(".", 1)[-1] in near_leaves]
    close = list(dict.fromkeys(same_leaf + near_key + near_leaf))[:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid keys here: {', '.join(valid_here)})")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is not None:  # list[float], int | None, ...
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


_FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(key: str, value, tp):
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float where asked)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not _INT64[0] <= value <= _INT64[1]:
                raise ConfigError(f"{key}: {value} does not fit a 64-bit integer; give a value in "
                                  f"[{_INT64[0]}, {_INT64[1]}]")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _float32(key, value)
        # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string; accept plain numeric literals only.
        if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            return _float32(key, value.strip())
    elif tp is str:
        if isinstance(value, str):
            return _plain_text(key, value)
    elif origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            _check_finite_tree(key, value)
            return dict(value)
    elif tp is Any:
        _check_finite_tree(key, value)
        return value
    else:  # pragma: no cover - only reached if a field gets an unsupported annotation
        raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")



class Problems:
    """The problems of one config, collected so that one message names them all.

    ``check(fn, *args)`` runs a validator and keeps its error (a ConfigError, or any of ``catch``);
    ``add(error)`` keeps an error found elsewhere; ``need(ok, message)`` keeps ``message`` when
    ``ok`` is false; ``raise_if_any()`` raises them: one problem as its own error, several as one
    error listing them, numbered, ``where`` they were found (a DataError when every one is)."""

    def __init__(self, catch: tuple = (ConfigError,), where: str = "in the config"):
        self.items: list[str] = []
        self.errors: list[Exception] = []  # what check() and add() kept, one per problem source
        self.catch, self.where = catch, where

    def check(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self.catch as e:
            self.add(e)
            return None

    def add(self, error: Exception) -> None:
        self.items.extend(getattr(error, "problems", None) or [str(error)])  # nested sections: one flat list
        self.errors.append(error)

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.items.append(message)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1 and len(self.errors) == 1:
            raise self.errors[0]  # one problem: the validator's own error, of its own kind
        only_data = len(self.errors) == len(self.items) and all(isinstance(e, DataError) for e in self.errors)
        error = (DataError if only_data else ConfigError)(
            self.items[0] if len(self.items) == 1 else f"{len(self.items)} problems {self.where}: "
            + "; ".join(f"({i}) {m}" for i, m in enumerate(self.items, 1)))
        error.problems = list(self.items)
        raise error


def build_section(root, cls, data, prefix: str = ""):
    """Build and validate the dataclass ``cls`` (a section of ``root``) from a nested dict."""
    if data is None and prefix:
        section = prefix.rstrip(".")
        raise ConfigError(f"{section}: the section is empty (a bare '{section.rsplit('.', 1)[-1]}:' line, or "
                          f"--set {section}=null), which would reset all of it to the defaults; give its keys, or "
                          "remove the line to keep the values it extends")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config file"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r} ({type(data).__name__})")
    hints = field_types(cls)
    kwargs = {}
    problems = Problems()  # every section's problem at once, not one relaunch per error
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            problems.items.append(str(unknown_key(root, key, list(hints))))
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = problems.check(build_section, root, tp, value, key + ".")
        else:
            kwargs[name] = problems.check(_coerce, key, value, tp)
    problems.raise_if_any()
    return cls(**kwargs)


def set_dotted(root, tree: dict, parts: list[str], value, text: str) -> None:
    """Set ``tree[parts[0]][parts[1]]... = value``, checking every part against ``root``'s keys."""
    node, cls = tree, root
    for depth, part in enumerate(parts):
        hints = field_types(cls)
        key = ".".join(parts[: depth + 1])
        if part not in hints:
            raise unknown_key(root, key, list(hints))
        tp = hints[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                # A whole section: its keys merge into what the recipe set (replacing it would
                # reset every key not named here); nothing at all is refused by build_section.
                if isinstance(value, dict) and isinstance(node.get(part), dict):
                    for k, v in value.items():
                        set_dotted(root, tree, [*parts, str(k)], v, text)
                    return
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override {text!r}: {key} is a value, not a section; it has no key {parts[depth + 1]!r}")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{key}: expected a mapping, got {child!r}")
        node, cls = child, tp
