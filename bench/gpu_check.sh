#!/usr/bin/env bash
# The CUDA path end to end, in one prepared run on a lent GPU machine, as its image is: python3 with torch
# (CUDA), transformers, sentencepiece, safetensors, pytest; hydra-core, omegaconf and antlr4 travel as
# wheels in .whl/ (built here by bench/gpu_wheels.sh, carried to the device) and are installed into a
# fresh --target directory, no network. Each step runs under its own timeout, its log in $OUT; a failed
# step does not stop the rest; the whole check stays under 8 minutes.
#   1. tests/test_tp_equivalence.py --device cuda: ours on the GPU (NCCL, a rank per GPU) against
#      transformers in float32, greedy tokens and logits;
#   2. the launcher on device=cuda with the tiny model (graphs=auto: the decode step replayed from a
#      CUDA graph): task=inference, precision (the demo questions), performance;
#   3. bench/gpu.py: the InternLM-7B shape in bfloat16, int8 and int4, eager and with graphs, against the read
#      roofline and transformers, graph tokens against eager tokens.
# --smoke: the same steps on the CPU (device=cpu, bench/gpu.py --smoke), to check the script here
# (tests/test_gpu_check.py runs it so). PYTHON: the interpreter (default python3); WHEELS: the wheels'
# folder (default .whl).
set -u
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if ! ls "$WHEELS"/hydra_core-*.whl "$WHEELS"/omegaconf-*.whl "$WHEELS"/antlr4_python3_runtime-*.whl > /dev/null 2>&1; then
    echo "gpu_check: $WHEELS/ lacks the hydra-core, omegaconf or antlr4 wheel: run bash bench/gpu_wheels.sh here and carry .whl" >&2
    exit 2
fi
site=$(mktemp -d)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import hydra, omegaconf; print('hydra', hydra.__version__, 'from', hydra.__file__)"
if [ $SMOKE = 1 ]; then
    device=cpu; echo "smoke: the steps on the CPU"
else
    device=cuda; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
work=$(mktemp -d)
trap 'rm -rf "$site" "$work"' EXIT
"$PY" -m tp.tiny "$work/tiny" > /dev/null && "$PY" -m tp.demo_data "$work/questions" > /dev/null || exit 1
failed=0
step() {  # step NAME SECONDS COMMAND...: its output in $OUT/NAME.log, PASS or FAIL and the log's tail here
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    if timeout -k 10 "$limit" bash -c '"$@"' step "$@" > "$OUT/$name.log" 2>&1; then echo "PASS $name ($((SECONDS - t0)) s)"
    else echo "FAIL $name (rc $?, $((SECONDS - t0)) s of $limit)"; tail -25 "$OUT/$name.log"; failed=1; fi
}
launch() {  # launch TASK OVERRIDES...: one rank on the device, the run's files listed and shown after its log
    local task=$1; shift
    "$PY" -m torch.distributed.run --nproc-per-node 1 launch/run.py task="$task" device=$device \
        model.path="$work/tiny" hydra.run.dir="$work/$task" "$@" || return $?
    find "$work/$task" -type f -not -name '*.log' | sort
    find "$work/$task" -type f \( -name '*.csv' -o -name '*.jsonl' -o -name '*.json' \) -size -20k -exec tail -n 8 {} +
}
export -f launch  # step's timeout runs it in a child bash
export PY device work
step equivalence 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_tp_equivalence.py --device $device
step inference 45 launch inference
step precision 45 launch precision task.data_dir="$work/questions"
step performance 45 launch performance
if [ $SMOKE = 1 ]; then step bench 150 "$PY" bench/gpu.py --smoke --out "$OUT/bench.json"
else step bench 210 "$PY" bench/gpu.py --out "$OUT/bench.json"; fi
tail -4 "$OUT/bench.log"
exit $failed
