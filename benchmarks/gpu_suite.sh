#!/usr/bin/env bash
# The GPU benchmark suite for one device session (H100/H200), under 6 minutes in all: BLIP-base
# at 384 px, random weights, bf16. Steps, each under its own timeout inside one overall budget:
#   1. the GPU tests of the SDPA swap (bf16 tolerance on CUDA) and of the device JPEG decoder;
#   2. benchmarks/bench_stages.py at batch 256 and 512: vision tower stock vs SDPA, captioner
#      stage vs stock generate, filter stage vs the strong stock baseline, FLOPs, host syncs;
#   3. benchmarks/bench_feed.py on this host: host CPU core-ms per image and images/s of `capfilt
#      run` with BLIP-base, JPEGs decoded on the device (run.resources.decode_on_device);
#   4. benchmarks/bench_stages.py --families: every captioner family and scorer (small random
#      models), the batched path vs Data-Juicer's per-image / per-pair loop, at batch 32;
#   5. if time is left: benchmarks/bench_run.py, `capfilt run` parquet -> parquet on 20,000 images.
# A step is skipped when too little of the budget is left for it. Writes ONE JSON, $OUT/gpu_suite.json (each step's figures, exit status and seconds), and the
# log $OUT/gpu_suite.log.
#
#   bash benchmarks/gpu_suite.sh                          # on the device: carry .devicepack (docs/benchmarks.md)
#   SMOKE=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh   # CPU check of this script: tiny model, small batches
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?OUT must name the folder for the results}
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
PARTS=$(mktemp -d)
: > "$LOG"
START=$(date +%s)

if [ "${SMOKE:-0}" = 1 ]; then
    PY=${PY:-.venv/bin/python}
    BUDGET=${SUITE_BUDGET_S:-900}
    STAGE_ARGS=(--device cpu --size tiny --repeats 1)
    BATCHES=(4 8)
    RUN_ARGS=(--size tiny --rows 40)
    FEED_ARGS=(--size feed --rows 40 120)
    FAMILY_ARGS=(--device cpu --families 2 --repeats 1 --max-length 4)
else
    PY=${PY:-python3}
    BUDGET=${SUITE_BUDGET_S:-330}  # seconds for everything, the install included
    STAGE_ARGS=(--device cuda --size base --dtype bfloat16 --repeats 3)
    BATCHES=(256 512)
    RUN_ARGS=(--size base --rows 20000)
    FEED_ARGS=(--size base --rows 1000 5000 --set run.resources.decode_on_device=true)
    FAMILY_ARGS=(--device cuda --dtype bfloat16 --families 32 --repeats 1)
    { bash .devicepack/install.sh && export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-} \
        && python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . ; } >> "$LOG" 2>&1 \
        || echo "install failed (see the log)" | tee -a "$LOG"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
fi
export PYTHONUNBUFFERED=1

# step NAME CAP_SECONDS MIN_SECONDS COMMAND...: runs COMMAND under min(CAP, budget left), or skips
# it when less than MIN_SECONDS are left; records "name rc seconds limit" in $PARTS/steps.txt.
step() {
    local name=$1 cap=$2 least=$3
    shift 3
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt "$least" ]; then
        echo "$name skipped $left" >> "$PARTS/steps.txt"
        echo "== $name: skipped, ${left}s left" | tee -a "$LOG"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local began=$(date +%s)
    timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "$name $rc $(($(date +%s) - began)) $limit" >> "$PARTS/steps.txt"
    echo "== $name: exit $rc after $(($(date +%s) - began))s" | tee -a "$LOG"
}

MODELS=$(mktemp -d)/models  # both stage runs share the random models (built once)
if [ "${SMOKE:-0}" != 1 ]; then
    step gpu_tests 120 30 "$PY" -m pytest -q -s -p no:cacheprovider -m gpu tests/model/test_sdpa.py \
        tests/model/test_device_decode.py
fi
for batch in "${BATCHES[@]}"; do
    step "stages_$batch" 150 60 "$PY" benchmarks/bench_stages.py "${STAGE_ARGS[@]}" --batch "$batch" \
        --models "$MODELS" --json "$PARTS/stages_$batch.json"
done
step feed 200 90 "$PY" benchmarks/bench_feed.py "${FEED_ARGS[@]}" --tree . --work "$(mktemp -d)" \
    --json "$PARTS/feed.json"
step families 150 60 "$PY" benchmarks/bench_stages.py "${FAMILY_ARGS[@]}" --json "$PARTS/families.json"
step run 200 120 "$PY" benchmarks/bench_run.py "${RUN_ARGS[@]}" --work "$(mktemp -d)" --json "$PARTS/run.json"

"$PY" - "$PARTS" "$OUT/gpu_suite.json" "$(($(date +%s) - START))" <<'EOF'
import json, sys
from pathlib import Path
parts, out, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
result = {"seconds": seconds, "steps": {}}
for line in (parts / "steps.txt").read_text().splitlines():
    name, rc, *rest = line.split()
    if rc == "skipped":
        result["steps"][name] = {"status": "skipped", "seconds_left": int(rest[0])}
        continue
    status = "ok" if rc == "0" else "timed out" if rc in ("124", "137") else "failed"
    entry = {"status": status, "exit": int(rc), "seconds": int(rest[0]), "limit_s": int(rest[1])}
    figures = parts / f"{name}.json"
    if figures.is_file():
        entry["figures"] = json.loads(figures.read_text())
    result["steps"][name] = entry
out.write_text(json.dumps(result, indent=2))
print(f"wrote {out}: " + ", ".join(f"{k} {v['status']}" for k, v in result["steps"].items()))
EOF
