"""End-to-end serving benchmark in one device call: `vllm serve` + `vllm bench serve`, one GPU lane per system list.

Systems (same model, trace and machine):
  dense           vLLM 0.26, its default backend (FlashAttention 3 on Hopper)
  native-offload  vLLM with its own CPU KV offload (--kv-offloading-size)
  sparse          SparseServe attention, no offload
  sparseserve     SparseServe with offload (all KV in pinned DRAM, an HBM page cache)
`--plan "0:dense,native-offload;1:sparse,sparseserve"` runs the systems of each lane one after another on that GPU
(CUDA_VISIBLE_DEVICES), the lanes side by side; `--tp 2 --plan "0,1:dense,sparse"` runs tensor-parallel servers.
Every server: dummy weights of a real config (configs/), prefix caching off; by default no torch.compile (`-O0`, to
fit a 10-minute device call) and full CUDA graphs for decode batches (`cudagraph_mode FULL_DECODE_ONLY`) for all
systems; `--opt-level N` (N >= 1) compiles and keeps vLLM's default graph mode instead (FULL_AND_PIECEWISE: full
graphs for decode batches, offload's too unless `dense_layers` > 0, and piecewise graphs around the attention of
other batches).
Per system, in order:
  batch1  `--batch1-prompts` requests of `--batch1-input` tokens, `--batch1-output` out, one at a time: the decode
          speed of a single request (mean TPOT);
  trace   for each `--rates` value, `--num-prompts` requests of a long-context mix like LongBench's, reproducible
          from `--seed`: `vllm bench serve`'s random dataset with inputs uniform in [4.1K, 127.9K] tokens and outputs
          uniform in [64, 512] (range ratios 0.938 / 0.778 around `--input-len` 66,000 / `--output-len` 288),
          Poisson arrivals at that rate. The i-th rate's requests come from seed `--seed` + i: the same trace for
          every system, new prompts for each rate (a system that keeps KV across requests, native offload's CPU
          cache, would otherwise serve a later rate's prompts from the earlier rate's KV).
Raw `vllm bench serve` JSON (per request: ttfts, itls) lands in `--out`; `<system>.json` holds per rate mean/p99
TTFT, mean/p99 TPOT, mean/p99 ITL, output tokens/s and the exact commands. `summarize_e2e.py` turns them into
ratios, goodput and plots.

    python benchmarks/e2e_serve.py --out benchmarks/results/e2e --plan "0:dense;1:sparse" --rates inf,0.2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

COMMON = ["--load-format", "dummy", "--served-model-name", "m", "--no-enable-prefix-caching", "--max-num-seqs", "64"]
SYSTEMS = {
    "dense": [],
    "native-offload": ["--kv-offloading-size", "48"],
    "sparse": ["--attention-backend", "sparseserve"],
    "sparseserve": ["--attention-backend", "sparseserve"],  # + --additional-config, built from the flags in main()
}
# NVLink multicast stays off on shared hosts (device notes): NCCL, PyTorch symmetric memory and NVSHMEM.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
LIVE_SERVERS: list = []  # stopped by the SIGTERM handler (a `timeout` around this script must not leave servers)
KEYS = ("completed", "duration", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
        "p99_itl_ms", "output_throughput", "total_token_throughput")


def bench(vllm: str, url: str, tokenizer: str, out: Path, name: str, extra: list[str]) -> dict:
    cmd = [vllm, "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", "m", "--tokenizer", tokenizer,
           "--dataset-name", "random", "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,99", "--save-result", "--save-detailed", "--result-dir", str(out),
           "--result-filename", name, *extra]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    r = json.loads((out / name).read_text())
    row = {k: r.get(k) for k in KEYS}
    row["wall_s"] = round(time.monotonic() - t0, 1)
    row["command"] = " ".join(cmd)
    return row


def run_system(system: str, gpus: str, tp: int, args, model: str, vllm: str, out: Path) -> None:
    from sparseserve_vllm.serve_process import VllmServer

    graphs = ["-cc", json.dumps({"cudagraph_mode": "FULL_DECODE_ONLY"})] if args.opt_level == 0 else []
    serve_args = [*COMMON, f"-O{args.opt_level}", *graphs, "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_util),
                  "--tensor-parallel-size", str(tp), *SYSTEMS[system]]
    tag = system if tp == 1 else f"{system}-tp{tp}"
    summary = {"system": system, "tp": tp, "gpus": gpus, "model": args.model, "serve_args": serve_args, "runs": {}}
    env = {"CUDA_VISIBLE_DEVICES": gpus, **NO_MULTICAST}
    t0 = time.monotonic()
    try:
        with VllmServer(model, serve_args, env=env, timeout_s=420, log_path=out / f"{tag}-server.log") as server:
            LIVE_SERVERS.append(server)
            summary["startup_s"] = round(time.monotonic() - t0, 1)
            summary["runs"]["batch1"] = bench(vllm, server.url, model, out, f"{tag}-batch1.json", [
                "--random-input-len", str(args.batch1_input), "--random-output-len", str(args.batch1_output),
                "--num-prompts", str(args.batch1_prompts), "--max-concurrency", "1", "--request-rate", "inf",
                "--seed", str(args.seed)])
            print(json.dumps({tag: {"batch1": summary["runs"]["batch1"]}}), flush=True)
            (out / f"{tag}.json").write_text(json.dumps(summary, indent=1))  # progress survives a kill
            for i, rate in enumerate(args.rates.split(",")):
                summary["runs"][f"rate-{rate}"] = bench(vllm, server.url, model, out, f"{tag}-rate{rate}.json", [
                    "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                    "--random-range-ratio", '{"input": 0.938, "output": 0.778}', "--num-prompts",
                    str(args.num_prompts), "--request-rate", rate, "--seed", str(args.seed + i)])
                print(json.dumps({tag: {rate: summary["runs"][f"rate-{rate}"]}}), flush=True)
                (out / f"{tag}.json").write_text(json.dumps(summary, indent=1))
    except Exception as e:  # keep the other systems' numbers
        summary["error"] = f"{type(e).__name__}: {e}"[-3000:]
        print(json.dumps({tag: summary["error"]}), flush=True)
    finally:
        (out / f"{tag}.json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    from gpu_model import model_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True, help='lanes "GPUS:SYSTEM,SYSTEM;GPUS:..." e.g. "0:dense;1:sparse"')
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rates", default="inf")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--batch1-prompts", type=int, default=3)
    ap.add_argument("--batch1-input", type=int, default=16384)
    ap.add_argument("--batch1-output", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-len", type=int, default=66000)
    ap.add_argument("--output-len", type=int, default=288)
    ap.add_argument("--max-model-len", type=int, default=131072)
    ap.add_argument("--gpu-util", type=float, default=0.9)
    ap.add_argument("--opt-level", type=int, default=0, choices=(0, 1, 2, 3),
                    help="vLLM's -O level for every server (see the module docstring)")
    ap.add_argument("--host-kv-gib", type=float, default=64, help="sparseserve: pinned host KV, all ranks together")
    ap.add_argument("--hbm-cache-gib", type=float, default=24, help="sparseserve: HBM page cache per GPU")
    ap.add_argument("--model-path", default=None, help="a local model folder instead of configs/<model> (dry runs)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    def on_term(*_):
        for server in LIVE_SERVERS:
            server.stop()
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)
    SYSTEMS["sparseserve"] += ["--additional-config", json.dumps({"sparseserve": {
        "offload": True, "host_kv_gib": args.host_kv_gib, "hbm_cache_gib": args.hbm_cache_gib}})]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model_path or model_dir(args.model)
    vllm = shutil.which("vllm", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    lanes = []
    for lane in args.plan.split(";"):
        gpus, systems = lane.split(":")
        for s in systems.split(","):
            if s not in SYSTEMS:
                raise SystemExit(f"--plan: unknown system {s!r}; allowed: {', '.join(SYSTEMS)}")
        lanes.append((gpus, systems.split(",")))

    def lane_worker(gpus, systems):
        for s in systems:
            run_system(s, gpus, args.tp, args, model, vllm, out)

    threads = [threading.Thread(target=lane_worker, args=lane) for lane in lanes]
    for t in threads:
        t.start()
        time.sleep(5)  # stagger startups (ports, compile caches)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
