"""fastlt's own design document (docs/design.md): it exists, everything that ships cites it and
no document outside the repository, the sections cited exist, and ``fastlt recipes`` shows the
published top-1 beside fastlt's own."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from fastlt.config.recipes import NOT_MEASURED, _read, design_doc, format_recipes, list_recipes

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / f for f in out.splitlines()
            if f.endswith((".py", ".md", ".yaml", ".sh", ".toml", ".cfg", ".txt")) or f in ("Makefile",)]


def test_nothing_cites_documents_outside_the_repository():
    outside = "ARCHI" + "TECTURE"  # spelled in two parts so that grep finds no citation here either
    for path in _tracked_text_files():
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        assert outside not in text, path
        assert "../" + "shared" not in text and "STYLE" + ".md" not in text, path


def test_cited_sections_and_headings_exist():
    doc = DESIGN.read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\d)\. ", doc, re.M))
    headings = set(re.findall(r"^### (.+?)\s*$", doc, re.M))
    cite = re.compile(r'design\.md`? §(\d)(?:[–-](\d))?(?:[,;]? \(?"([^"]+)")?')
    seen = 0
    for path in _tracked_text_files():
        if not path.is_file():
            continue
        for m in cite.finditer(path.read_text(encoding="utf-8")):
            seen += 1
            assert m.group(1) in sections, (path, m.group(0))
            name = m.group(3)
            if name and not name.startswith("steps"):
                # "Distributed" is the short form of "Distributed = one big GPU".
                assert any(h == name or h.startswith(name + " ") for h in headings), (path, m.group(0))
    assert seen > 50  # the code cites it throughout


def test_design_doc_names_modules_that_exist():
    doc = DESIGN.read_text(encoding="utf-8")
    for rel in set(re.findall(r"`((?:fastlt|kernels|pipelines)/[\w/]+\.py)`", doc)):
        assert (REPO / rel).is_file(), rel
    assert design_doc() == DESIGN


def test_recipes_table_has_published_and_fastlt_columns(tmp_path):
    table = format_recipes().splitlines()
    assert table[0].split() == ["recipe", "paper", "fastlt", "description"]
    row = next(line for line in table if line.startswith("imagenet_lt_resnext50_90ep "))
    assert re.match(r"imagenet_lt_resnext50_90ep +59\.76 +not yet measured +ImageNet-LT", row), row
    assert all(r.fastlt_top1 is None for r in list_recipes())  # no full fastlt run is recorded yet
    assert any("docs/design.md §2" in line and str(DESIGN) in line for line in table)
    # Once measured, the recipe's first line carries it and the table shows it.
    measured = tmp_path / "m.yaml"
    measured.write_text("# ImageNet-LT, ResNet-50 — published top-1 58.49; fastlt top-1 58.12\n")
    own = tmp_path / "own.yaml"
    own.write_text("# my data — fastlt top-1 40.5\n")
    r, o = _read(measured), _read(own)
    assert (r.description, r.top1, r.fastlt_top1) == ("ImageNet-LT, ResNet-50", 58.49, 58.12)
    assert (o.description, o.top1, o.fastlt_top1) == ("my data", None, 40.5)
    rows = format_recipes([r, o]).splitlines()
    assert re.match(r"m +58\.49 +58\.12 +ImageNet-LT", rows[2]) and re.match(r"own +- +40\.50 +my data", rows[3])
    assert NOT_MEASURED not in rows[2] + rows[3]
