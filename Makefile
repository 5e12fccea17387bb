# fastlt developer commands. `make test` and `make demo` work from a fresh clone:
# they create .venv if it is missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastlt-installed

.PHONY: install test test-slow bench demo clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The multi-process cluster tests (several ranks on loopback: SLURM, a killed rank, ZeRO at
# another world size, elastic restarts), which `make test` leaves out; CI runs both.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

# The one-command demo: trains ConCutMix on the synthetic long-tailed dataset (generated once,
# cached under data_cache/) and prints overall/many/medium/few accuracy and the run directory.
# Extra options: make demo DEMO_ARGS="--set method.l_d_warm=24" (CutMix labels throughout).
demo: $(STAMP)
	$(VENV)/bin/fastlt demo $(DEMO_ARGS)

# Benchmarks print their tables, then the speed-up ratios are checked against bench/floors.json
# (ratios, never absolute times: these machines are shared and noisy).
bench: $(STAMP)
	mkdir -p .benchmarks
	$(PY) -m pytest -q bench --benchmark-json=.benchmarks/latest.json --benchmark-columns=min,median,mean,rounds
	$(PY) bench/check_floors.py .benchmarks/latest.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .benchmarks
