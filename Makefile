# make test / make demo work on a fresh machine: they build .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := demo
TORCHRUN := $(VENV)/bin/torchrun --nproc-per-node 2

.PHONY: test demo clean
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The main job on the built-in tiny model: cut it for 2 ranks, then C-Eval and inference over 2 processes.
demo: $(VENV)/.installed
	$(PY) -m tp.tiny $(DEMO)/tiny-internlm
	$(PY) -m cut_weights input_dir=$(DEMO)/tiny-internlm output_dir=$(DEMO)/tiny-internlm-tp2 world_size=2 overwrite=true
	rm -rf $(DEMO)/precision $(DEMO)/inference
	$(TORCHRUN) launch/run.py task=precision model.path=$(DEMO)/tiny-internlm-tp2 task.batch_size=8 \
		hydra.run.dir=$(DEMO)/precision
	$(TORCHRUN) launch/run.py task=inference model.path=$(DEMO)/tiny-internlm-tp2 hydra.run.dir=$(DEMO)/inference
	@echo
	@echo "demo results:"
	@echo "  C-Eval (random tiny model, so near 25%): $(DEMO)/precision/test_result/"
	@echo "  inference:                               $(DEMO)/inference/inference.jsonl"

clean:
	rm -rf $(VENV) $(DEMO) outputs multirun .pytest_cache
