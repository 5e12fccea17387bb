"""Long-tailed datasets: list files, image folders, CIFAR-LT and a synthetic long-tailed image set.

Four sources feed the samplers (``fastlt.method.sampling``) and the pipelines
(``fastlt.pipelines``); each exposes ``labels`` (int64), ``class_counts`` (the N_j of
docs/design.md §1) and ``num_classes``:

- :mod:`~fastlt.data.lists` — :class:`LongTailedList`, the ImageNet-LT / iNaturalist 2018 /
  Places-LT list format (``relative/path.jpg label`` per line);
- :mod:`~fastlt.data.folder` — :class:`ImageFolderLT`, one sub-folder per class (the same
  interface as :class:`LongTailedList`), and the class-name files;
- :mod:`~fastlt.data.cifar` — :func:`cifar_lt`, CIFAR-10-LT / CIFAR-100-LT from the python
  pickle batches, into an in-memory :class:`ArrayDataset`;
- :mod:`~fastlt.data.synthetic` — :func:`make_synthetic_lt`, a small long-tailed JPEG set with
  real class signal, written once and cached (the demo, the tests, the benchmarks);
- :mod:`~fastlt.data.profile` — :func:`long_tail_counts`, the exponential / step profiles;
- :mod:`~fastlt.data.config` — the ``data`` config section; :mod:`~fastlt.data.build` — the
  datasets of a config.

Nothing here imports torch.
"""
from .cifar import CIFAR_NAMES, ArrayDataset, cifar_lt
from .folder import ImageFolderLT
from .lists import LongTailedList
from .profile import IMB_TYPES, long_tail_counts
from .synthetic import MAX_SYNTHETIC_CLASSES, SyntheticLT, make_synthetic_lt

__all__ = ["ArrayDataset", "CIFAR_NAMES", "IMB_TYPES", "ImageFolderLT", "LongTailedList", "MAX_SYNTHETIC_CLASSES",
           "SyntheticLT", "cifar_lt", "long_tail_counts", "make_synthetic_lt"]
