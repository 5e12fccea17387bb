"""Data pipelines for fastlt, installed as `fastlt.pipelines` (see setup.py's package_dir):
the DALI training/validation graphs and the torch DataLoader backend, both producing the
typed training batch of ARCHITECTURE §3.
"""
