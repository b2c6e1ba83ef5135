#!/usr/bin/env bash
# One H200 device call for the sparse-decode goal (issue #3), every selector at its default settings: the GPU kernel
# tests, then one decode attention step (score + select + attend) at batch 64 x 32K, budget 2048, Llama-3.1-8B shape,
# against vLLM's FlashAttention-3 on the same KV, in vLLM's block size with this backend (128). Quest also at 32-token
# pages (its default before 64). Needs vLLM 0.26 and this checkout importable (../shared/gpu/README.md); writes one
# JSON per run into OUT_DIR (default: $OUT, the device tool's output folder) and prints their headline numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:?give an output folder}}"
mkdir -p "$out"
timeout 200 python -m pytest -q -x tests/kernels/test_sparse_decode.py tests/kernels/test_decode_plan.py \
    tests/kernels/test_page_scores.py -p no:cacheprovider 2>&1 | tail -2
for run in quest cuboid_mean mean "quest 32"; do
    set -- $run
    name="sd-$1${2:+-p$2}"
    timeout 120 python benchmarks/bench_sparse_decode.py --selector "$1" ${2:+--page-size "$2"} --block-size 128 \
        --no-sdpa --out "$out/$name.json" > "/tmp/$name.log" 2>&1 || tail -20 "/tmp/$name.log"
    python - "$out/$name.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); c = d["config"]; t = d["times_us"]; bw = d["bandwidth_fraction_of_4.8TBps"]
print(c["selector"], c["gqa_reduce"], "page", c["page_size"], "block", c["block_size"], "sink/recent", c["sink_pages"],
      c["recent_pages"], "| step %.1f us (score %.1f, select %.1f, attend %.1f) | FA3 %.1f us | %.2fx | HBM %.3f | "
      "failures %s" % (t["wrapper_run"], t["score_pages"], t["select_pages_fused_slots"], t["sparse_attention"],
                       d["dense_baselines"]["vllm_fa3"]["us"], d["speedup_vs_vllm_fa3"], bw["wrapper_run"],
                       d["checks"]["failures"]))
PY
done
