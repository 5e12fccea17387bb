"""The published split lists of ImageNet-LT, Places-LT and iNaturalist 2018: what each one is
(dataset, split, lines, classes, SHA-256 of the text), where it is published, which of them ship
with fastlt, and the check ``fastlt data`` runs on a user's copy.

The lists were defined by OLTR (Liu et al., CVPR 2019: ImageNet-LT, Places-LT) and by the
iNaturalist 2018 competition (its train2018.json / val2018.json, one line per image); the copies
fastlt ships are those of facebookresearch/classifier-balancing (commit ``CB_COMMIT``, folder
``data/``), which publishes them under its BSD licence (kept beside them as
``fastlt/data/splits/LICENSE``). They are gzip-compressed in ``fastlt/data/splits/`` and read
as they are (``LongTailedList`` reads ``.gz`` lists). The two training lists that are not
shipped (ImageNet-LT 115,846 lines, iNaturalist 2018 437,513 lines) are known by their line and
class counts only; ``fastlt data`` prints their SHA-256 so a user can compare copies.

Only the lists ship: the images stay under their owners' terms (ImageNet, Places365 and
iNaturalist are for non-commercial research), and a user downloads them from the sources in
``DATASETS``.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CB_COMMIT", "DATASETS", "PUBLISHED", "DatasetSource", "PublishedList", "describe", "file_digest",
           "identify", "missing_list_hint", "root_hint", "shipped_dir", "shipped_entry", "shipped_list"]

#: The commit of https://github.com/facebookresearch/classifier-balancing the shipped lists come from.
CB_COMMIT = "f162adef63fdf592d0b8a0f6e52bc481fc08785f"
_CB = f"https://github.com/facebookresearch/classifier-balancing/tree/{CB_COMMIT}/data"


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset's images and split lists come from, and what data.root must hold."""

    name: str
    images: str
    lists: str
    licence: str
    root: str


DATASETS: dict[str, DatasetSource] = {
    "ImageNet-LT": DatasetSource(
        "ImageNet-LT",
        images="ILSVRC-2012 training and validation images, https://image-net.org/download (registration; "
               "non-commercial research terms)",
        lists=f"{_CB}/ImageNet_LT (val and test ship with fastlt; the original release is OLTR's, "
              "https://github.com/zhmiao/OpenLongTailRecognition-OLTR)",
        licence="lists: BSD (classifier-balancing; OLTR's code is BSD-3); images: ImageNet's terms",
        root="the ILSVRC-2012 folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (validation images "
             "sorted into class folders); e.g. --set data.root=/path/to/ImageNet"),
    "Places-LT": DatasetSource(
        "Places-LT",
        images="Places365-Standard, http://places2.csail.mit.edu/download.html (the 256x256 'easy format' "
               "archive, whose places365_standard/ folder has train/<class>/ and val/<class>/)",
        lists=f"{_CB}/Places_LT (train, val and test ship with fastlt; OLTR's original release)",
        licence="lists: BSD (classifier-balancing); images: Places365's terms (non-commercial research)",
        root="the places365_standard folder holding train/<class>/ and val/<class>/; "
             "e.g. --set data.root=/path/to/places365_standard"),
    "iNaturalist 2018": DatasetSource(
        "iNaturalist 2018",
        images="train_val2018.tar.gz of the iNaturalist 2018 competition, "
               "https://github.com/visipedia/inat_comp/tree/master/2018",
        lists=f"{_CB}/iNaturalist18 (val ships with fastlt; the training list is train2018.json written as "
              "'file_name category_id' lines, classifier-balancing's gen_lists.py)",
        licence="lists: BSD (classifier-balancing), from the competition's annotations; images: their "
                "photographers' licences, as the competition states",
        root="the folder holding train_val2018/<kingdom>/<class id>/*.jpg; "
             "e.g. --set data.root=/path/to/iNaturalist18"),
    "CIFAR-LT": DatasetSource(
        "CIFAR-LT",
        images="https://www.cs.toronto.edu/~kriz/cifar.html: cifar-10-python.tar.gz (MD5 "
               "c58f30108f718f92721af3b95e74349a) and cifar-100-python.tar.gz (MD5 eb9058c3a382ffc7106e4002c42a8d85)",
        lists="none: the long-tailed subset is computed from the training batches (data.imb_factor, "
              "data.cifar_subset_seed 10 as ConCutMix)",
        licence="CIFAR's own terms (cite Krizhevsky 2009)",
        root="the folder holding the extracted cifar-10-batches-py/ or cifar-100-python/; "
             "e.g. --set data.root=/path/to/cifar"),
}


@dataclass(frozen=True)
class PublishedList:
    """One published split list: its file name, what it is and how to recognise a copy."""

    file: str
    dataset: str
    split: str
    lines: int
    num_classes: int
    per_class: str
    """Images per class: "20 each" for the balanced splits, "max .., min .." for training lists."""
    sha256: str | None
    """Of the uncompressed text as published; None where fastlt has no copy to take it from."""
    shipped: bool
    variant: str = ""
    """Which copy, where one file name has several published forms."""


PUBLISHED: tuple[PublishedList, ...] = (
    PublishedList("ImageNet_LT_train.txt", "ImageNet-LT", "train", 115846, 1000, "max 1280, min 5", None, False),
    PublishedList("ImageNet_LT_val.txt", "ImageNet-LT", "val", 20000, 1000, "20 each",
                  "9af7ba688acf9532ff5845a8fb14a1e97fdc4c51ac48bc72c08ea9c3f7ff142e", True),
    PublishedList("ImageNet_LT_test.txt", "ImageNet-LT", "test", 50000, 1000, "50 each",
                  "d1590191cf8a71fada7b1aaedaa2d139a2aea93ff2f1b755319d0bd8dbaa55d5", True),
    PublishedList("Places_LT_train.txt", "Places-LT", "train", 62500, 365, "max 4980, min 5",
                  "726c4871dcbf07ce2f857703bfe32e9a83ffbf52d704239f6d95c4f4f4c247f7", True),
    PublishedList("Places_LT_val.txt", "Places-LT", "val", 7300, 365, "20 each",
                  "719e3cf3766c09134ea28f56f1036c78def511ac1ed2c2532a6beef78f2439ba", True),
    PublishedList("Places_LT_test.txt", "Places-LT", "test", 36500, 365, "100 each",
                  "44eee8441c8098c59195465abede425721bc35525d75209f9433b161a6eb37bc", True),
    # ConCutMix's repository carries Places-LT with every path under places365_standard/ (data.root is then
    # the folder above it); the same images and labels, line for line.
    PublishedList("Places_LT_train.txt", "Places-LT", "train", 62500, 365, "max 4980, min 5",
                  "f209ade1f5929f1872804748a52ab11766fd8c2ec8cb0d011a6e2a8ee36fc1ae", False,
                  "ConCutMix's copy, paths under places365_standard/"),
    PublishedList("Places_LT_val.txt", "Places-LT", "val", 7300, 365, "20 each",
                  "9f7b58d59c05cfaa03d50d749e9ecaef99405ed7c536fd09e92243818a4609a9", False,
                  "ConCutMix's copy, paths under places365_standard/"),
    PublishedList("iNaturalist18_train.txt", "iNaturalist 2018", "train", 437513, 8142, "max 1000, min 2", None,
                  False),
    PublishedList("iNaturalist18_val.txt", "iNaturalist 2018", "val", 24426, 8142, "3 each",
                  "efaeff65f80641b60864470e6f255aa69453406ef5717eec8c6681748f3a61f3", True),
)


def shipped_dir() -> Path:
    """The folder of the shipped lists (package data, or the source tree)."""
    return Path(__file__).resolve().parent / "splits"


def shipped_entry(name: str) -> PublishedList | None:
    """The shipped published list called ``name`` (its file name), or None."""
    base = Path(name).name.removesuffix(".gz")  # the shipped file's own name (X.txt.gz) names it too
    return next((p for p in PUBLISHED if p.file == base and p.shipped), None)


def shipped_list(name: str) -> Path | None:
    """The shipped, compressed copy of the list called ``name`` (its file name), or None."""
    entry = shipped_entry(name)
    path = shipped_dir() / f"{entry.file}.gz" if entry else None
    return path if path is not None and path.is_file() else None


def _known(name: str) -> list[PublishedList]:
    base = Path(name).name.removesuffix(".gz")
    return [p for p in PUBLISHED if p.file == base]


def root_hint(list_name: str) -> str:
    """What data.root must be for a list called ``list_name`` (its dataset's layout), or a
    dataset-neutral hint for a list fastlt does not know."""
    known = _known(list_name)
    if known:
        return f"{known[0].dataset}: {DATASETS[known[0].dataset].root}"
    return f"the folder the paths in {Path(list_name).name} are relative to (--set data.root=/path/to/dataset)"


def missing_list_hint(list_name: str) -> str:
    """Where to get a published list that is missing (empty for a list fastlt does not know)."""
    known = _known(list_name)
    if not known:
        return ""
    p = known[0]
    return (f"{p.file} is the published {p.dataset} {p.split} list ({p.lines} lines); get it from "
            f"{DATASETS[p.dataset].lists}")


def file_digest(path: str | Path) -> tuple[str, int]:
    """(SHA-256 of the text, number of lines) of a list file; a ``.gz`` file is read uncompressed."""
    data = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        data = gzip.decompress(data)
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    return hashlib.sha256(data).hexdigest(), lines


def describe(p: PublishedList) -> str:
    """'the published <dataset> <split> list' (and which copy)."""
    return f"the published {p.dataset} {p.split} list" + (f" ({p.variant})" if p.variant else "")


def identify(path: str | Path) -> tuple[PublishedList | None, str]:
    """Which published list the file at ``path`` is, and one line saying so (or how it differs
    from the published list of its name). (None, "") for a file whose name and content fastlt
    does not know."""
    digest, lines = file_digest(path)
    for p in PUBLISHED:
        if p.sha256 == digest:
            return p, f"{describe(p)}: {p.lines} lines, {p.num_classes} classes, sha256 {digest[:16]}… (verified)"
    text = Path(path).read_bytes()
    text = gzip.decompress(text) if str(path).endswith(".gz") else text
    if b"\r\n" in text:  # a copy saved with Windows line endings is the same split: compare it with LF endings
        lf = hashlib.sha256(text.replace(b"\r\n", b"\n")).hexdigest()
        for p in PUBLISHED:
            if p.sha256 == lf:
                return p, (f"{describe(p)}: {p.lines} lines, {p.num_classes} classes, sha256 {lf[:16]}… with LF "
                           "line endings (verified; this copy has CRLF endings)")
    known = _known(str(path))
    if not known:
        return None, ""
    p = known[0]
    if p.sha256 is None:
        if lines == p.lines:
            return p, (f"{describe(p)} by its name and line count ({lines} lines; fastlt has no checksum of it: "
                       f"sha256 {digest})")
        return None, (f"warning: named like {describe(p)}, but it has {lines} lines where the published one has "
                      f"{p.lines}: not the published split")
    return None, (f"warning: named like {describe(p)}, but its content differs ({lines} lines, published "
                  f"{p.lines}; sha256 {digest[:16]}…, published {p.sha256[:16]}…): not the published split")
