"""Pass-key retrieval accuracy of SparseServe versus dense attention, in real vLLM (CPU build or GPU).

A five-digit key is hidden at `--placements` evenly spaced depths of ~`--filler` filler sentences (300 -> about 7K
SmolLM2 tokens). Each configuration runs in its own vLLM engine over the same prompts with greedy decoding: dense
(vLLM's own backend) and SparseServe for every selector at every budget. Reports accuracy per configuration and
writes JSON.

    python benchmarks/eval_passkey.py --out benchmarks/results/passkey-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparseserve_vllm.models import smollm2_dir  # noqa: E402
from sparseserve_vllm.prompts import passkey_prompt  # noqa: E402


def run(model, backend, sparseserve, prompts, cpu):
    import torch
    from vllm import LLM, SamplingParams

    kw = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=2 << 30) if cpu else {}
    if sparseserve is not None:
        kw["additional_config"] = {"sparseserve": sparseserve}
    llm = LLM(model=model, attention_backend=backend, max_model_len=8192, max_num_batched_tokens=8192,
              enable_prefix_caching=False, seed=0, **kw)
    t = time.time()
    outs = llm.chat([[{"role": "user", "content": p}] for p, _ in prompts],
                    SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    secs = time.time() - t
    answers = [o.outputs[0].text for o in outs]
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    hits = [key in a for a, (_, key) in zip(answers, prompts)]
    return {"backend": backend, "sparseserve": sparseserve, "accuracy": sum(hits) / len(hits),
            "correct": sum(hits), "n": len(hits), "seconds": round(secs, 1), "answers": answers}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--placements", type=int, default=20)
    ap.add_argument("--filler", type=int, default=300)
    ap.add_argument("--budgets", default="1024,2048")
    ap.add_argument("--selectors", default="cuboid_mean,quest,mean")
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    cpu = not torch.cuda.is_available()
    model = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(model)
    prompts = []
    for i in range(args.placements):
        p, key = passkey_prompt(i, args.filler, (i + 0.5) / args.placements)
        prompts.append((p + " Answer with the number only.", key))
    lengths = [len(tok(p).input_ids) for p, _ in prompts]
    plan = [("CPU_ATTN" if cpu else "FLASH_ATTN", None)] + [
        ("sparseserve", {"selector": s, "token_budget": int(b), "stats_interval_s": 0})
        for b in args.budgets.split(",") for s in args.selectors.split(",")
    ]
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu" if cpu else torch.cuda.get_device_name(),
              "prompt_tokens": {"min": min(lengths), "max": max(lengths)}, "placements": args.placements, "runs": []}
    for backend, ss in plan:
        result["runs"].append(run(model, backend, ss, prompts, cpu))
        r = result["runs"][-1]
        print(json.dumps({k: v for k, v in r.items() if k != "answers"}), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
