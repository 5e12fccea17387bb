"""Triton kernels for fastlt, installed as `fastlt.kernels` (see setup.py's package_dir).

Every kernel has a pure-PyTorch reference in the library (the spec) and is chosen by the
single dispatch function of this package.
"""
