"""fastlt: a performance-engineered ConCutMix / BCL trainer for long-tailed recognition.

`kernels/` and `pipelines/` live at the top of the repository (docs/design.md §3) but are
installed only as `fastlt.kernels` and `fastlt.pipelines` through `package_dir`: both
top-level names are taken on PyPI, so they must never be installed as top-level packages.
The recipes of `configs/` are installed as package data in `fastlt/configs/` (fastlt.config.recipes
finds them there, or in the source tree), and the documents of `docs/` in `fastlt/docs/`.
"""
from setuptools import setup

setup(
    name="fastlt",
    version="0.1.0",
    description="Contrastive CutMix (ConCutMix) on Balanced Contrastive Learning, with DALI, Triton and DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastlt", "fastlt.config", "fastlt.data", "fastlt.method", "fastlt.models", "fastlt.training",
              "fastlt.reports", "fastlt.kernels", "fastlt.pipelines", "fastlt.configs", "fastlt.docs"],
    package_dir={"fastlt": "fastlt", "fastlt.kernels": "kernels", "fastlt.pipelines": "pipelines",
                 "fastlt.configs": "configs", "fastlt.docs": "docs"},
    # The published split lists that may be redistributed (fastlt.data.published), with their BSD licence.
    # docs/*.md as fastlt/docs: `fastlt recipes` cites docs/design.md, so an installed fastlt carries it.
    package_data={"fastlt.configs": ["*.yaml"], "fastlt.data": ["splits/*.txt.gz", "splits/LICENSE"],
                  "fastlt.docs": ["*.md"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "timm>=1.0,<2",
        "numpy>=1.24,<3",
        "pyyaml>=6,<7",
        "tqdm>=4.60,<5",
        "pillow>=10,<13",
        "deepspeed>=0.15,<0.20",
        "safetensors>=0.4,<1",
        "tensorboard>=2.14,<3",
        "matplotlib>=3.7,<4",
    ],
    # DALI as DALI ships it, one wheel per CUDA major version: pick the one matching your torch
    # build (torch.version.cuda). Without either, training uses the torch DataLoader backend.
    extras_require={
        "dali-cuda12": ["nvidia-dali-cuda120>=1.50,<3"],
        "dali-cuda13": ["nvidia-dali-cuda130>=1.51,<3"],
        "test": ["pytest>=8,<10", "pytest-benchmark>=4,<6", "pytest-xdist>=3.5,<4", "hypothesis>=6,<7", "scipy>=1.10,<2",
                 # torch-tb-profiler (and the pandas it needs) reads fastlt profile's TensorBoard trace in a test
                 "pandas>=2,<4", "torch-tb-profiler>=0.4,<1"],
    },
    entry_points={"console_scripts": ["fastlt=fastlt.cli:main"]},
)
