# fastlt developer commands. `make test` and `make demo` work from a fresh clone:
# they create .venv if it is missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastlt-installed
# The test suite covers the DALI pipelines too, so `make` installs a DALI extra (CPU operators
# need no GPU): dali-cuda13 matches torch's default CUDA 13 wheels; DALI_EXTRA=dali-cuda12 for
# a CUDA 12 torch.
DALI_EXTRA ?= dali-cuda13

.PHONY: install test test-slow bench demo clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,$(DALI_EXTRA)]'
	touch $(STAMP)

install: $(STAMP)

# The suite in parallel, one worker per core (pytest-xdist; --dist loadfile keeps each file's
# shared runs on one worker, so they are built once), without the multi-process cluster
# simulations marked slow; `make test-slow` runs those (one at a time: each is several processes).
# .ci/run runs both.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

# What `make test` leaves out (marker slow; CI runs both): the end-to-end tier (whole CLI runs,
# DALI at 1/2/4 ranks, compiled steps, the wheel install: tests/conftest.py END_TO_END) in
# parallel, then the multi-process cluster simulations (several ranks on loopback: SLURM, a
# killed rank, ZeRO at another world size, elastic restarts; marker cluster) one at a time.
test-slow: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m "slow and not cluster" tests
	$(PY) -m pytest -q -m "slow and cluster" tests

# The one-command demo: trains ConCutMix on the synthetic long-tailed dataset (generated once,
# cached under data_cache/) and prints overall/many/medium/few accuracy and the run directory.
# Extra options: make demo DEMO_ARGS="--set method.l_d_warm=16" (CutMix labels throughout).
demo: $(STAMP)
	$(VENV)/bin/fastlt demo $(DEMO_ARGS)

# Benchmarks print their tables, then the speed-up ratios are checked against bench/floors.json
# (ratios, never absolute times: these machines are shared and noisy). Without a GPU every CPU
# floor must hold and the GPU floors are reported as not measured; on a GPU machine a GPU floor
# without its result fails.
bench: $(STAMP)
	mkdir -p .benchmarks
	$(PY) -m pytest -q bench --benchmark-json=.benchmarks/latest.json --benchmark-columns=min,median,mean,rounds
	$(PY) bench/check_floors.py .benchmarks/latest.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .benchmarks
