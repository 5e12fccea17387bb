"""List-file datasets: the ImageNet-LT / iNaturalist 2018 / Places-LT format
(``relative/path.jpg label`` per line), handing out encoded image bytes that the DALI
pipelines decode on the GPU (nvJPEG) or the torch loader decodes with PIL.
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np

from fastlt.paths import expect_file, read_regular

from .profile import bincount, check_index, check_positive_int

__all__ = ["LongTailedList"]

# How many offending entries an error message lists before it just gives the count.
_SHOW_FIRST = 5
_LOG = logging.getLogger("fastlt.data")


class LongTailedList:
    """A dataset given by a list file of ``relative/path.jpg label`` lines.

    Each line is split on its LAST run of whitespace, so paths containing spaces survive;
    blank lines are ignored. Line numbers in messages are 1-based lines of the file.

    Args:
        root: directory the relative paths are resolved against.
        list_file: the list file.
        num_classes: number of classes; inferred as max label + 1 when None.
        check_files: check up front that every image exists (see :meth:`check_files`).
        require_all_classes: every class in [0, num_classes) must have at least one image
            (training lists); pass False for val/test lists.

    Attributes: ``root`` (Path), ``list_file`` (Path), ``paths`` (list of relative str),
    ``labels`` (int64 array), ``num_classes`` (int), ``class_counts`` (int64, length C).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        list_file: str | os.PathLike,
        num_classes: int | None = None,
        *,
        check_files: bool = False,
        require_all_classes: bool = True,
    ) -> None:
        self.root = Path(root)
        self.list_file = Path(list_file)
        if num_classes is not None:
            num_classes = check_positive_int("num_classes", num_classes)
        expect_file(self.list_file, "list file", error=ValueError, missing_error=FileNotFoundError,
                    missing=f"list file {self.list_file} does not exist")
        try:
            raw = read_regular(self.list_file)
        except OSError as e:
            raise ValueError(f"list file {self.list_file} cannot be read: {e.strerror or e}") from None
        if self.list_file.suffix == ".gz":  # the published lists shipped with fastlt (fastlt.data.published)
            try:
                raw = gzip.decompress(raw)
            except (gzip.BadGzipFile, EOFError, OSError) as e:
                raise ValueError(f"{self.list_file}: not a readable gzip file ({e})") from None
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first path.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = e.object[: e.start].count(b"\n") + 1
            raise ValueError(f"{self.list_file}: line {line} is not valid UTF-8 ({e.reason})") from None

        # Parse with whole-list operations (str methods in comprehensions, one numpy
        # conversion of the labels): the 437k-line iNaturalist list takes well under 1 s.
        lines = text.splitlines()
        stripped = [ln.strip() for ln in lines]
        keep = [i for i, s in enumerate(stripped) if s]
        if not keep:
            raise ValueError(f"{self.list_file}: no entries (the file is empty or only blank lines)")
        # 1-based line numbers of the entries, kept for error messages.
        self._line_numbers = np.asarray(keep, dtype=np.int64) + 1
        parts = [stripped[i].rsplit(None, 1) for i in keep]
        bad = [k for k, p in enumerate(parts) if len(p) != 2]
        if bad:
            k = bad[0]
            raise ValueError(
                f"{self.list_file}: line {self._line_numbers[k]} is malformed: expected "
                f"'<relative/path.jpg> <integer label>', got {lines[keep[k]]!r}"
                + (f" ({len(bad)} malformed lines in all)" if len(bad) > 1 else "")
            )
        self.paths: list[str] = [p[0] for p in parts]
        self.labels = self._parse_labels([p[1] for p in parts])
        self._check_duplicates()

        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0:
            k = int(np.argmax(self.labels < 0))
            raise ValueError(
                f"{self.list_file}: line {self._line_numbers[k]} has label {self.labels[k]}; "
                f"labels must be in [0, num_classes)"
            )
        if num_classes is None:
            num_classes = hi + 1
        elif hi >= num_classes:
            k = int(np.argmax(self.labels >= num_classes))
            raise ValueError(
                f"{self.list_file}: line {self._line_numbers[k]} has label {self.labels[k]}, but "
                f"num_classes is {num_classes} (labels must be in [0, {num_classes})); "
                f"pass the dataset's number of classes or fix the list"
            )
        self.num_classes: int = num_classes
        if require_all_classes:
            # From the labels present, not from a count array of num_classes entries: a wrong
            # num_classes of 10^10 is named here instead of allocating 80 GB.
            present = np.unique(self.labels)
            if present.size < num_classes:
                empty = np.setdiff1d(np.arange(min(num_classes, present.size + _SHOW_FIRST)), present)
                raise ValueError(
                    f"{self.list_file}: {num_classes - present.size} of {num_classes} classes have no image "
                    f"(first: {empty[:_SHOW_FIRST].tolist()}); every class in [0, {num_classes}) "
                    f"needs a training image. Fix num_classes or the list, or pass "
                    f"require_all_classes=False for a val/test list"
                )
        self.class_counts = bincount(self.labels, num_classes)
        if check_files:
            self.check_files()

    def _parse_labels(self, tokens: list[str]) -> np.ndarray:
        try:
            return np.array([int(t) for t in tokens], dtype=np.int64)
        except (ValueError, OverflowError):
            pass
        # Slow path only to locate the culprit for the message.
        for k, t in enumerate(tokens):
            try:
                v = int(t)
                np.int64(v)
            except (ValueError, OverflowError):
                raise ValueError(
                    f"{self.list_file}: line {self._line_numbers[k]} has label {t!r}, which is not "
                    f"an integer (int64); expected '<relative/path.jpg> <integer label>'"
                ) from None
        raise AssertionError("unreachable: a label failed to parse but none was found")

    def _check_duplicates(self) -> None:
        """A path listed twice with two labels is a contradiction (ValueError); listed twice with
        one label it would weigh twice in the class counts, the prior and the samplers (warning,
        kept in ``duplicate_lines``: (line, line of its first occurrence))."""
        first: dict[str, int] = {}
        self.duplicate_lines: list[tuple[int, int]] = []
        for k, p in enumerate(self.paths):
            j = first.setdefault(p, k)
            if j == k:
                continue
            if self.labels[j] != self.labels[k]:
                raise ValueError(f"{self.list_file}: line {self._line_numbers[k]} lists {p} with label "
                                 f"{self.labels[k]}, but line {self._line_numbers[j]} lists it with label "
                                 f"{self.labels[j]}; an image has one class: remove one of the lines")
            self.duplicate_lines.append((int(self._line_numbers[k]), int(self._line_numbers[j])))
        if self.duplicate_lines:
            shown = ", ".join(f"line {a} (= line {b})" for a, b in self.duplicate_lines[:_SHOW_FIRST])
            _LOG.warning(f"{self.list_file}: {len(self.duplicate_lines)} line(s) repeat an image already listed "
                         f"with the same label, so it counts twice in the class counts and the samplers: {shown}. "
                         "Remove the repeated lines unless the weighting is meant")

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"LongTailedList({str(self.list_file)!r}, n={len(self)}, num_classes={self.num_classes}, "
            f"counts max/min={int(self.class_counts.max())}/{int(self.class_counts.min())})"
        )

    def _index(self, i: int) -> int:
        return check_index(i, len(self.paths), f"{self.list_file} with {len(self.paths)} entries")

    def line_number(self, i: int) -> int:
        """1-based line of the list file that entry ``i`` comes from."""
        return int(self._line_numbers[self._index(i)])

    def full_path(self, i: int) -> str:
        """Path of image ``i`` (root joined with its relative path), as a str."""
        return os.path.join(self.root, self.paths[self._index(i)])

    def read_bytes(self, i: int) -> bytes:
        """The encoded (e.g. JPEG) bytes of image ``i``."""
        i = self._index(i)
        path = self.full_path(i)
        try:
            return read_regular(path)  # a FIFO or device named like an image is refused, never read
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image {path} does not exist (line {self._line_numbers[i]} of {self.list_file}); "
                f"check root={str(self.root)!r} or the list"
            ) from None

    def check_files(self) -> None:
        """Raise FileNotFoundError naming how many images are missing and the first few.

        Lists each image directory once instead of stat-ing every file: on network file
        systems one listing per directory is much cheaper than one stat per image.
        """
        listing: dict[str, set[str] | None] = {}
        missing: list[int] = []
        for k, rel in enumerate(self.paths):
            full = os.path.join(self.root, rel)
            d, name = os.path.split(full)
            names = listing.get(d, False)
            if names is False:
                try:
                    names = set(os.listdir(d))
                except (OSError, ValueError):  # missing, not a folder, a name too long, a NUL: none listed
                    names = None
                listing[d] = names
            if names is None or name not in names:
                missing.append(k)
        if missing:
            first = ", ".join(
                f"{os.path.join(self.root, self.paths[k])} (line {self._line_numbers[k]})"
                for k in missing[:_SHOW_FIRST]
            )
            raise FileNotFoundError(
                f"{len(missing)} of {len(self)} images listed in {self.list_file} are missing "
                f"under root {self.root}; first: {first}"
            )
