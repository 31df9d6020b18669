#!/usr/bin/env bash
# Builds .whl/: the packages the lent GPU machine's image lacks (its published package list: Python 3.12,
# torch 2.11, transformers, sentencepiece, safetensors, pytest; no hydra-core, omegaconf or antlr4), as
# wheels for Python 3.12, so that bench/gpu_check.sh can install them there with no network. Run it here
# (it needs the package registry), then hand `.whl` to the device run as a carried path.
#   bash bench/gpu_wheels.sh [DIR]   (default .whl; PYTHON: the pip to download with, default .venv/bin/python,
#                                     whose installed versions are the ones pinned)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIR=${1:-.whl}
rm -rf "$DIR" && mkdir -p "$DIR"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# The versions the tests ran with here (pure Python: one wheel serves every Python 3).
"$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 -d "$DIR" \
    "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)"
# antlr4's runtime 4.9.3 (what omegaconf 2.3 pins) is published only as an sdist: built into a wheel here.
"$PY" -m pip wheel -q --no-deps -w "$DIR" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls "$DIR"
