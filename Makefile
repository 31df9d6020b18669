# make test / make demo work on a fresh machine: they build .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := demo

.PHONY: test demo clean
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) -m tp.tiny $(DEMO)/tiny-internlm
	$(VENV)/bin/torchrun --nproc-per-node 2 launch/run.py task=inference model.path=$(DEMO)/tiny-internlm \
		hydra.run.dir=$(DEMO)/inference
	@echo "demo results: $(DEMO)/inference/inference.jsonl"

clean:
	rm -rf $(VENV) $(DEMO) outputs multirun .pytest_cache
