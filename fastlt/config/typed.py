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
  the last one without a word, so a section written twice loses the first);
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

from fastlt.errors import ConfigError

__all__ = ["Problems", "build_section", "field_types", "flat_keys", "load_yaml", "one_of", "positive", "set_dotted",
           "unknown_key"]


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
    """YAML ``text`` (from ``source``, named in errors) with SafeLoader's types; duplicate keys and
    syntax errors are one-line ConfigErrors naming the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"{source}: not valid YAML: {where}{what}") from None


def _finite(key: str, value: float) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number; got {value!r}")
    return value


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
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(key, float(value))
        # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string; accept plain numeric literals only.
        if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            return _finite(key, float(value))
    elif tp is str:
        if isinstance(value, str):
            return value
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

    ``check(fn, *args)`` runs a validator and keeps its ConfigError; ``need(ok, message)`` keeps
    ``message`` when ``ok`` is false; ``raise_if_any()`` raises one ConfigError listing them
    (numbered when there are several)."""

    def __init__(self):
        self.items: list[str] = []

    def check(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            self.items.extend(getattr(e, "problems", None) or [str(e)])  # nested sections: one flat list
            return None

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.items.append(message)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        error = ConfigError(self.items[0] if len(self.items) == 1 else f"{len(self.items)} problems in the config: "
                            + "; ".join(f"({i}) {m}" for i, m in enumerate(self.items, 1)))
        error.problems = list(self.items)
        raise error


def build_section(root, cls, data, prefix: str = ""):
    """Build and validate the dataclass ``cls`` (a section of ``root``) from a nested dict."""
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
