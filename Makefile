# dus-pipeline. `make upscale-train` runs the whole demo; `make test` runs the tests.
# Both set up .venv themselves: torch is installed first, pinned (a CPU wheel here; unpinned torch
# pulls GBs of CUDA packages), then the project with its pinned ranges.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: setup upscale-train test test-fast preflight clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test,eval]"
	touch $(STAMP)

# The embedded demo: tiny base model -> merge 8->12 layers -> cpt -> sft -> eval.
upscale-train: $(STAMP)
	$(PY) -m pipeline $(ARGS)

# Only the checks (data, models, merge plan, distributed, disk space) and the estimates of disk,
# memory per device and time; exit 0 if the run can start, 2 with every problem listed.
#   make preflight ARGS="experiment=solar_10.7b"
preflight: $(STAMP)
	$(PY) -m pipeline preflight=true $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf outputs multirun .cache
