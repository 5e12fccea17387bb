"""The recipes shipped with fastlt: the YAML files of ``configs/``, installed with the package
as ``fastlt/configs/`` (setup.py ``package_data``), so that an installed fastlt can name them.

* :func:`recipe_dir` — where they are: ``fastlt/configs`` in an installed package, the
  repository's ``configs/`` in a source checkout (editable installs included);
* :func:`resolve_config` — what ``--config`` accepts: a path (it wins), or a recipe name
  (``imagenet_lt_resnext50_90ep``, with or without ``.yaml``);
* :func:`list_recipes` / :func:`format_recipes` — ``fastlt recipes``: each recipe with its
  description, published top-1 and fastlt's own top-1, read from the recipe's first line
  (``# <description> — published top-1 59.76``, and ``; fastlt top-1 <x>`` once a full run of
  fastlt has measured it: until then the table says "not yet measured").

No torch here.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from fastlt.errors import ConfigError

__all__ = ["NOT_MEASURED", "Recipe", "design_doc", "format_recipes", "list_recipes", "recipe_dir", "resolve_config"]

_TOP1 = re.compile(r"\s*[—-]+\s*published top-1 ([\d.]+)(\s*\(unconfirmed\))?\s*(?:;\s*fastlt top-1 ([\d.]+)\s*)?$")
_FASTLT_ONLY = re.compile(r"\s*[—-]+\s*fastlt top-1 ([\d.]+)\s*$")
NOT_MEASURED = "not yet measured"
_PACKAGE = Path(__file__).resolve().parent.parent  # fastlt/


@dataclass(frozen=True)
class Recipe:
    """One recipe file: its name (the file stem), path, first-line description, published top-1
    and the top-1 fastlt's own full run of it reached (None: not yet measured)."""

    name: str
    path: Path
    description: str
    top1: float | None
    unconfirmed: bool = False
    fastlt_top1: float | None = None


def recipe_dir() -> Path:
    """The folder of the shipped recipes (installed package first, then the source checkout)."""
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise ConfigError(f"no recipes found: neither {_PACKAGE / 'configs'} (installed package) nor "
                      f"{_PACKAGE.parent / 'configs'} (source checkout) holds YAML files; reinstall fastlt")


def design_doc() -> Path:
    """fastlt's design document, docs/design.md: installed as ``fastlt/docs/design.md`` (setup.py
    ``package_data``), or in the source checkout."""
    for candidate in (_PACKAGE / "docs" / "design.md", _PACKAGE.parent / "docs" / "design.md"):
        if candidate.is_file():
            return candidate
    return _PACKAGE.parent / "docs" / "design.md"


def _read(path: Path) -> Recipe:
    first = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            first = line.lstrip("#").strip()
        break
    m = _TOP1.search(first)
    top1 = float(m.group(1)) if m else None
    own = m.group(3) if m else ((f := _FASTLT_ONLY.search(first)) and f.group(1))
    end = m.start() if m else (f.start() if own else len(first))
    return Recipe(path.stem, path, first[:end].strip().rstrip("."), top1, bool(m and m.group(2)),
                  float(own) if own else None)


def list_recipes() -> list[Recipe]:
    """Every shipped recipe, sorted by name."""
    return [_read(p) for p in sorted(recipe_dir().glob("*.yaml"))]


def resolve_config(arg: str, what: str = "--config") -> Path:
    """The recipe file ``--config arg`` means: an existing path, else a shipped recipe of that name.

    A missing path of the form ``configs/<name>.yaml`` (the README's commands, run outside the
    source tree) also resolves to the shipped recipe ``<name>``.
    """
    from fastlt.paths import kind_of

    path = Path(arg)
    kind = kind_of(path)
    if kind == "file":
        return path
    if kind.startswith("not a usable path"):
        raise ConfigError(f"{what} {arg!r} is {kind}")
    if kind == "folder":  # e.g. a run directory: its config is a file inside
        inside = f"; {path / 'config.yaml'} is the config of this run" if (path / "config.yaml").is_file() else ""
        raise ConfigError(f"{what} {arg}: a folder, not a recipe file; pass a YAML file{inside}")
    if kind != "missing":
        raise ConfigError(f"{what} {arg} is {kind}, not a YAML file; pass a recipe file or a shipped recipe's name")
    names = {p.stem: p for p in recipe_dir().glob("*.yaml")}
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if (path.parent == Path(".") or path.parent.name == "configs") and stem in names:
        return names[stem]
    close = difflib.get_close_matches(stem, list(names), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{what} {arg}: no such file, and no shipped recipe of that name{hint}. Pass a YAML path or "
                      f"one of: {', '.join(sorted(names))} (`fastlt recipes` lists them)")


def format_recipes(recipes: list[Recipe] | None = None) -> str:
    """The ``fastlt recipes`` table: name, published top-1, fastlt's top-1, description; then
    where the figures come from and where the recipes live."""
    recipes = list_recipes() if recipes is None else recipes
    width = max(len(r.name) for r in recipes)
    own_w = len(NOT_MEASURED)
    lines = [f"{'recipe':<{width}}  {'paper':>6}   {'fastlt':<{own_w}}  description",
             f"{'-' * width}  {'-' * 7}  {'-' * own_w}  {'-' * 40}"]
    for r in recipes:
        top1 = f"{'-':>6} " if r.top1 is None else f"{r.top1:6.2f}" + ("*" if r.unconfirmed else " ")
        own = NOT_MEASURED if r.fastlt_top1 is None else f"{r.fastlt_top1:.2f}"
        lines.append(f"{r.name:<{width}}  {top1}  {own:<{own_w}}  {r.description}")
    lines.append("")
    lines.append(f"paper: the published top-1 of the recipe (* unconfirmed), - where none is; where each comes from: "
                 f"docs/design.md §2 ({design_doc()}).")
    lines.append("fastlt: top-1 of a full run of the recipe with fastlt, once one is recorded; the demo's expected "
                 "figures are in the README, \"Demo\".")
    lines.append(f"recipes in {recipe_dir()}; train one with `fastlt train --config NAME` (a path also works).")
    return "\n".join(lines)
