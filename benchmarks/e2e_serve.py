"""End-to-end serving benchmark of one system, in one device call: `vllm serve` + `vllm bench serve` at several rates.

Systems (same model, trace and machine):
  dense           vLLM 0.26, its default backend (FlashAttention 3 on Hopper)
  native-offload  vLLM with its own CPU KV offload (--kv-offloading-size)
  sparse          SparseServe attention, no offload
  sparseserve     SparseServe with offload (all KV in pinned DRAM, an HBM page cache)
Trace: a long-context mix like LongBench's, reproducible from `--seed`: `vllm bench serve`'s random dataset with
inputs uniform in [4K, 128K] tokens and outputs uniform in [64, 512] (range ratios 0.938 / 0.778 around 66K / 288),
Poisson arrivals at each `--rates` value. Each rate's raw JSON lands in `--out`, plus `<system>.json` summarising
mean/p99 TTFT, mean/p99 TPOT (TBT), output tokens/s and goodput per rate.

    python benchmarks/e2e_serve.py --system sparseserve --out benchmarks/results/e2e --rates 0.1,0.2,0.4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

SYSTEMS = {
    "dense": [],
    "native-offload": ["--kv-offloading-size", "48"],
    "sparse": ["--attention-backend", "sparseserve"],
    "sparseserve": ["--attention-backend", "sparseserve", "--additional-config",
                    json.dumps({"sparseserve": {"offload": True, "host_kv_gib": 64, "hbm_cache_gib": 40}})],
}


def main() -> None:
    from gpu_model import model_dir

    from sparseserve_vllm.serve_process import VllmServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--system", choices=sorted(SYSTEMS), required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rates", default="0.1,0.2,0.4,inf")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tbt-slo-ms", type=float, default=None, help="goodput TPOT SLO (25x one decode iteration)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.model)
    serve_args = ["--load-format", "dummy", "--max-model-len", "131200", "--served-model-name", "m",
                  "--no-enable-prefix-caching", *SYSTEMS[args.system]]
    summary = {"system": args.system, "model": args.model, "serve_args": serve_args, "rates": {}}
    vllm = shutil.which("vllm", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    with VllmServer(model, serve_args, timeout_s=420, log_path=out / f"{args.system}-server.log") as server:
        for rate in args.rates.split(","):
            name = f"{args.system}-rate{rate}.json"
            cmd = [vllm, "bench", "serve", "--backend", "vllm", "--base-url", server.url, "--model", "m",
                   "--tokenizer", model, "--dataset-name", "random", "--random-input-len", "67584",
                   "--random-output-len", "288", "--random-range-ratio", '{"input": 0.938, "output": 0.778}',
                   "--num-prompts", str(args.num_prompts), "--request-rate", rate, "--seed", str(args.seed),
                   "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                   "--save-result", "--result-dir", str(out), "--result-filename", name]
            if args.tbt_slo_ms:
                cmd += ["--goodput", f"tpot:{args.tbt_slo_ms}"]
            subprocess.run(cmd, check=True)
            r = json.loads((out / name).read_text())
            summary["rates"][rate] = {k: r.get(k) for k in (
                "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "output_throughput",
                "request_goodput", "completed")}
            summary["rates"][rate]["command"] = " ".join(cmd)
            print(json.dumps({rate: summary["rates"][rate]}), flush=True)
    (out / f"{args.system}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
