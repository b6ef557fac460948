# `make demo` and `make test` each build their own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The longest test files start first, so the two workers finish together (pytest drops the repeats).
SLOW_FIRST := tests/train/test_distributed.py tests/train/test_loop.py tests/test_continuous.py tests/models/test_decoder.py \
	tests/test_sprt.py tests/test_cli.py tests/train/test_multihost.py tests/test_sampler.py tests/test_posterior.py \
	tests/test_notebook.py tests/train/test_memory_plan.py

.PHONY: demo test clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m optpo_jax.cli compare --workdir runs/compare

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -n 2 --dist loadfile --durations=25 $(SLOW_FIRST) tests

clean:
	rm -rf $(VENV) *.egg-info
