# make test / make demo work on a fresh machine: they build .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := demo
TORCHRUN := $(VENV)/bin/torchrun --nproc-per-node 2

# This project's CI layout keeps the real C-Eval beside the checkout: use it there. A user's clone has
# nothing beside it, and then the tests and the demo use the project's built-in demo questions.
CEVAL_DIR := $(wildcard $(abspath ../shared/ceval))
export INTERNLM_TP_CEVAL_DIR ?= $(CEVAL_DIR)
ifneq ($(INTERNLM_TP_CEVAL_DIR),)
PRECISION_DATA := $(INTERNLM_TP_CEVAL_DIR)
PRECISION_RUN  := $(DEMO)/precision-ceval
else
PRECISION_DATA := $(DEMO)/demo-questions
PRECISION_RUN  := $(DEMO)/precision-demo-questions-not-ceval
endif

.PHONY: test demo clean
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15

# The main job on the built-in tiny model: cut it for 2 ranks, then C-Eval and inference over 2 processes.
demo: $(VENV)/.installed
	$(PY) -m tp.tiny $(DEMO)/tiny-internlm
	$(PY) -m cut_weights input_dir=$(DEMO)/tiny-internlm output_dir=$(DEMO)/tiny-internlm-tp2 world_size=2 overwrite=true
	rm -rf $(DEMO)/precision-* $(DEMO)/inference
	test -n "$(INTERNLM_TP_CEVAL_DIR)" || $(PY) -m tp.demo_data $(PRECISION_DATA)
	$(TORCHRUN) launch/run.py task=precision model.path=$(DEMO)/tiny-internlm-tp2 task.batch_size=8 \
		task.data_dir=$(PRECISION_DATA) hydra.run.dir=$(PRECISION_RUN)
	$(TORCHRUN) launch/run.py task=inference model.path=$(DEMO)/tiny-internlm-tp2 hydra.run.dir=$(DEMO)/inference
	@echo
	@echo "demo results (a random tiny model, so accuracy near 25%):"
	@echo "  precision on $(PRECISION_DATA): $(PRECISION_RUN)/test_result/"
	@echo "  inference: $(DEMO)/inference/inference.jsonl"

clean:
	rm -rf $(VENV) $(DEMO) outputs multirun .pytest_cache
