#!/usr/bin/env bash
# The CUDA path end to end, in one prepared run on a lent GPU machine (its python3 has torch with CUDA,
# transformers, sentencepiece, safetensors, pytest; hydra-core, omegaconf and antlr4 travel as wheels in
# .whl/, see docs/performance.md). Each step's log lands in $OUT; a failed step does not stop the rest.
#   1. tests/test_tp_equivalence.py --device cuda: ours on the GPU (NCCL, a rank per GPU) against
#      transformers in float32, greedy tokens and logits;
#   2. the launcher on device=cuda with the tiny model (graphs=auto: the decode step replayed from a
#      CUDA graph): task=inference, precision (the demo questions), performance;
#   3. bench/gpu.py: the InternLM-7B shape in bfloat16, int8 and int4, eager and with graphs, against the read
#      roofline and transformers, graph tokens against eager tokens.
# Check it on the CPU first: python bench/gpu.py --smoke.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
work=$(mktemp -d)
python3 -m tp.tiny "$work/tiny" > /dev/null && python3 -m tp.demo_data "$work/questions" > /dev/null || exit 1
failed=0
step() {  # step NAME COMMAND...: its output in $OUT/NAME.log, PASS or FAIL and the log's tail here
    local name=$1; shift
    local t0=$SECONDS
    if "$@" > "$OUT/$name.log" 2>&1; then echo "PASS $name ($((SECONDS - t0)) s)"
    else echo "FAIL $name (rc $?, $((SECONDS - t0)) s)"; tail -25 "$OUT/$name.log"; failed=1; fi
}
launch() {  # launch TASK OVERRIDES...: one rank on the GPU, the run's files listed and shown after its log
    local task=$1; shift
    torchrun --nproc-per-node 1 launch/run.py task="$task" device=cuda model.path="$work/tiny" \
        hydra.run.dir="$work/$task" "$@" || return $?
    find "$work/$task" -type f -not -name '*.log' | sort
    find "$work/$task" -type f \( -name '*.csv' -o -name '*.jsonl' -o -name '*.json' \) -size -20k -exec tail -n 8 {} +
}
step equivalence python3 -m pytest -q -p no:cacheprovider tests/test_tp_equivalence.py --device cuda
step inference launch inference
step precision launch precision task.data_dir="$work/questions"
step performance launch performance
step bench python3 bench/gpu.py --out "$OUT/bench.json"
tail -4 "$OUT/bench.log"
exit $failed
