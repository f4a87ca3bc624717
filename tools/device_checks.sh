#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md and the GPU tests, as one short run on a single
# H100/H200 host where megatron-core (and, for FP8, Transformer Engine) is importable:
#
#   OUT=/tmp/out bash tools/device_checks.sh            # results under $OUT
#
# Writes $OUT/bench.jsonl (tools/bench_train.py, one JSON line per configuration),
# $OUT/estimate.jsonl (tools/estimate_memory.py for the same configurations), $OUT/env.txt
# (GPU, driver, versions, commit) and $OUT/pytest.txt (tests/test_gpu.py). Each benchmark has
# its own time limit (STEP_TIMEOUT seconds, default 240), so one slow case cannot eat the rest.
# DEVICE_CHECKS_TE_ONLY=1 runs only the Transformer Engine cases and tests (the bf16 local-spec
# rows are already in docs/benchmarks.md); tools/device_kit.sh sets it. PYTEST_TIMEOUT bounds the
# tests (default STEP_TIMEOUT).
set -uo pipefail

OUT=${OUT:?set OUT to a results directory}
PYTHON=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse --short HEAD 2>/dev/null || echo "commit: unknown (not a git checkout)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PYTHON" - <<'EOF'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
for mod in ("megatron.core", "transformer_engine", "apex"):
    print(mod, "present" if importlib.util.find_spec(mod.split(".")[0]) else "absent")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

has_te=$("$PYTHON" -c 'import importlib.util as u; print(int(u.find_spec("transformer_engine") is not None))')

# smollm2-1.7b at sequence 2048 on one GPU: the goals of docs/benchmarks.md
BASE=(model.preset=smollm2-1.7b train.seq_length=2048 train.micro_batch_size=4
      train.global_batch_size=32)
CASES=("train.precision=bf16"
       "train.precision=bf16 model.recompute=full")
[ "${DEVICE_CHECKS_TE_ONLY:-0}" = 1 ] && CASES=()
if [ "$has_te" = 1 ]; then
    CASES+=("train.precision=bf16 model.layer_spec=te"
            "train.precision=fp8 train.fp8_recipe=delayed model.layer_spec=te"
            "train.precision=fp8 train.fp8_recipe=tensorwise model.layer_spec=te")
fi

for case in "${CASES[@]}"; do
    read -r -a extra <<<"$case"
    echo "== bench: ${case}"
    timeout "$STEP_TIMEOUT" "$PYTHON" tools/bench_train.py "${BASE[@]}" "${extra[@]}" \
        --warmup 3 --steps 10 --json "$OUT/bench.jsonl" || echo "bench failed: ${case}"
    "$PYTHON" tools/estimate_memory.py "${BASE[@]}" "${extra[@]}" --json "$OUT/estimate.jsonl" \
        >/dev/null || echo "estimate failed: ${case}"
done

echo "== tests/test_gpu.py"
K=()
[ "${DEVICE_CHECKS_TE_ONLY:-0}" = 1 ] && K=(-k "transformer_engine or fp8")
timeout "${PYTEST_TIMEOUT:-$STEP_TIMEOUT}" "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py \
    -p no:cacheprovider "${K[@]}" >"$OUT/pytest.txt" 2>&1
tail -n 5 "$OUT/pytest.txt"
