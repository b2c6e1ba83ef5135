#!/usr/bin/env bash
# One H200 device call for the hierarchical-KV goals (issue #4), in one run: FlashH2D vs a contiguous pinned H2D copy
# (and one copy per page), FlashD2H vs a contiguous D2H copy, and a 32K-token prefill with offload (layer-segmented)
# vs without (one step). Needs vLLM 0.26 and this checkout importable (../shared/gpu/README.md); writes three JSONs
# into OUT_DIR (default: $OUT, the device tool's output folder) and prints their headline numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:?give an output folder}}"
mkdir -p "$out"
timeout 90 python benchmarks/bench_flash_h2d.py --page-kib 16 --num-sms 16,132 --tile-kib 16,32 --out "$out/h2d.json" > /tmp/h2d.log 2>&1
timeout 120 python benchmarks/bench_flash_d2h.py --tokens 32768 --threads 4 --sms 8 --tile-kib 16 --out "$out/d2h.json" > /tmp/d2h.log 2>&1
timeout 330 python benchmarks/gpu_segmented_prefill.py --part prefill --systems plain,segmented --long-len 65536 \
    --repeats 3 --out "$out/seg.json" > /tmp/seg.log 2>&1
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
h2d = json.load(open(f"{out}/h2d.json"))
print("FlashH2D best ratio", h2d["best_ratio_per_page_kib"], "verified", h2d["all_verified"])
d2h = json.load(open(f"{out}/d2h.json"))
for r in d2h["results"]:
    print("FlashD2H", r["tokens"], "tokens: scatter kernel", [e["ratio"] for e in r["flash_d2h_uva"]],
          "whole blocks", {e["block_ids"]: e["ratio"] for e in r.get("flash_d2h_blocks", [])})
seg = json.load(open(f"{out}/seg.json"))
print("segmented / plain prefill: 32K", seg.get("segmented_vs_plain_mid_s"), "64K", seg.get("segmented_vs_plain_long_s"))
PY
