#!/usr/bin/env bash
# Diagnostics of offload under vLLM's full CUDA graphs on one GPU, in under 9 minutes. Run from the repository root:
#
#     OUT=/path/to/out PYTHONPATH=$PWD bash benchmarks/gpu_offload_graphs_diag.sh
#
# (OUT defaults to /tmp/sparseserve-diag; PYTHON to python.) Writes under $OUT, and prints at the end:
#   env.log        versions, GPU, commit;
#   tests.log      the three GPU-relevant core test files, without -x, -rA --tb=long;
#   engine_A.log   the minimal engine with offload + FULL_DECODE_ONLY (Llama-3.1-8B shape cut to 4 layers, dummy
#                  weights, max_model_len 8192, 2 prompts of 600 tokens, 16 greedy tokens), VLLM_LOGGING_LEVEL=DEBUG;
#   engine_B.log   the same engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with the OLD statistics thread put
#                  back (it reads the tier's device counters, `tier.stats()`, every 10 ms): the root-cause check of
#                  the engine-start failure (expected: A starts and generates; B fails in the CUDA-graph capture with
#                  a stream-capture error if the statistics thread's GPU syncs were the cause);
#   offload_step.* bench_offload_step.py (the eager offload decode step outside vLLM, 16 x 8K, 32 layers, 2 GiB
#                  cache), to compare with main's recorded benchmarks/results/offload-step-h200-2026-11-29-after.json;
#   engine_C.log   the same engine as A with enforce_eager, for token equality with A (if time is left);
#   summary.txt    what is printed: results, every Python traceback of every log in full, the logs' tails.
set -u
OUT=${OUT:-/tmp/sparseserve-diag}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONFAULTHANDLER=1 TORCH_SHOW_CPP_STACKTRACES=1 PYTHONUNBUFFERED=1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

{
  echo "date: $(date -u)"; echo "pwd: $PWD"; echo "PYTHONPATH: ${PYTHONPATH:-}"
  git log -1 --oneline 2>/dev/null || echo "(no git)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1
  $PY -c "import torch, triton, vllm; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| vllm', vllm.__version__)" 2>&1
  free -g 2>&1 | head -3
} > "$OUT/env.log" 2>&1

# ---- (i) tests, no -x --------------------------------------------------------------------------------------------
timeout -k 10 180 $PY -m pytest -rA --tb=long -p no:cacheprovider \
  tests/core/test_offload_tier.py tests/core/test_flash_d2h.py tests/core/test_page_cache.py > "$OUT/tests.log" 2>&1
echo "pytest exit code: $? (124 = timed out)  [t=$(elapsed)s]" >> "$OUT/tests.log"

# ---- (ii) engines ------------------------------------------------------------------------------------------------
cat > "$OUT/engine_run.py" <<'EOF'
import json
import os
import sys
import threading
import time
import traceback

variant = sys.argv[1]  # A: as is; B: in-process, old statistics thread; C: enforce_eager
if variant == "B":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
t0 = time.perf_counter()


def say(*a):
    print(f"[diag {variant} t={time.perf_counter() - t0:.1f}s]", *a, flush=True)


try:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from gpu_model import model_dir
    from sparseserve_vllm.stats import read_totals

    if variant == "B":
        from sparseserve_vllm.adapter import runtime as runtime_module

        def old_publish_loop(self):  # what the statistics thread did before: device reads from another thread
            while True:
                time.sleep(0.01)
                tier = self.tier
                if tier is not None:
                    try:
                        tier.stats()
                    except Exception:
                        say("statistics thread raised:\n" + traceback.format_exc())
                        return

        runtime_module.SparseRuntime._publish_loop = old_publish_loop
        say("old statistics thread patched in (in-process engine)")
    ss = {"offload": True, "host_kv_gib": 2, "hbm_cache_gib": 0.25, "token_budget": 256, "stats_interval_s": 0}
    kw = dict(additional_config={"sparseserve": ss})
    if variant == "C":
        kw["enforce_eager"] = True
    else:
        kw.update(optimization_level=0, compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"})
    say("starting engine", json.dumps({k: v for k, v in kw.items()}))
    llm = LLM(model=model_dir("llama-3.1-8b"), hf_overrides={"num_hidden_layers": 4}, load_format="dummy",
              attention_backend="sparseserve", max_model_len=8192, gpu_memory_utilization=0.5,
              skip_tokenizer_init=True, enable_prefix_caching=False, seed=0, max_num_seqs=8, **kw)
    say("ENGINE STARTED; cudagraph_mode =", llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)
    prompts = [[(7 * i + 13 * r) % 490 + 3 for i in range(600)] for r in range(2)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    say("GENERATED", json.dumps(tokens))
    time.sleep(1.2)
    totals = read_totals()
    say("counters", json.dumps({k: v for k, v in totals.items() if v}))
    with open(os.path.join(os.environ["OUT"], f"tokens_{variant}.json"), "w") as f:
        json.dump(tokens, f)
    say("RESULT OK")
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:
        say("shutdown:", repr(e))
except BaseException:
    say("RESULT FAILED\n" + traceback.format_exc())
    sys.exit(1)
EOF
export OUT
VLLM_LOGGING_LEVEL=DEBUG timeout -k 10 160 $PY "$OUT/engine_run.py" A > "$OUT/engine_A.log" 2>&1
echo "[diag] engine A exit code: $? (124 = timed out)  [t=$(elapsed)s]" >> "$OUT/engine_A.log"
if [ "$(elapsed)" -lt 370 ]; then
  VLLM_LOGGING_LEVEL=DEBUG timeout -k 10 $(( 470 - $(elapsed) )) $PY "$OUT/engine_run.py" B > "$OUT/engine_B.log" 2>&1
  echo "[diag] engine B exit code: $? (124 = timed out)  [t=$(elapsed)s]" >> "$OUT/engine_B.log"
else
  echo "[diag] engine B skipped: no time left  [t=$(elapsed)s]" > "$OUT/engine_B.log"
fi
# The eager per-step cost (cause 3): the offload decode step outside vLLM, same arguments as main's recorded run
# benchmarks/results/offload-step-h200-2026-11-29-after.json (batch 16 x 8K, 32 layers, 2 GiB cache: 245 ms/step).
if [ "$(elapsed)" -lt 400 ]; then
  timeout -k 10 $(( 480 - $(elapsed) )) $PY benchmarks/bench_offload_step.py --batch 16 --context 8192 \
    --cache-gib 2 --steps 8 --out "$OUT/offload_step.json" > "$OUT/offload_step.log" 2>&1
  echo "[diag] bench_offload_step exit code: $? (124 = timed out)  [t=$(elapsed)s]" >> "$OUT/offload_step.log"
else
  echo "[diag] bench_offload_step skipped: no time left  [t=$(elapsed)s]" > "$OUT/offload_step.log"
fi
if [ "$(elapsed)" -lt 420 ]; then
  timeout -k 10 $(( 505 - $(elapsed) )) $PY "$OUT/engine_run.py" C > "$OUT/engine_C.log" 2>&1
  echo "[diag] engine C exit code: $? (124 = timed out)  [t=$(elapsed)s]" >> "$OUT/engine_C.log"
else
  echo "[diag] engine C skipped: no time left  [t=$(elapsed)s]" > "$OUT/engine_C.log"
fi

# ---- (iii) report --------------------------------------------------------------------------------------------------
$PY - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json
import os
import re
import sys

out = sys.argv[1]
PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s?)")  # vLLM's per-process prefix, e.g. "(EngineCore_DP0 pid=12) "
LOG_RECORD = re.compile(r"^(INFO|DEBUG|WARNING|ERROR|CRITICAL|\[diag|\[rank|\d\d-\d\d \d\d:|=+ )")


def strip(line):
    return PREFIX.sub("", line)


def tracebacks(lines):
    """Every 'Traceback (most recent call last):' block, in full, with its exception line(s); duplicates once."""
    seen, blocks, i = set(), [], 0
    while i < len(lines):
        if "Traceback (most recent call last)" not in lines[i]:
            i += 1
            continue
        j, block = i + 1, [lines[i]]
        while j < len(lines):
            s = strip(lines[j])
            block.append(lines[j])
            j += 1
            if s.strip() and not s[0].isspace():  # the exception line
                extra = 0  # its message's further lines (not log records, not a new traceback), at most 30
                while j < len(lines) and extra < 30:
                    t = strip(lines[j])
                    if "Traceback (most recent call last)" in t or LOG_RECORD.match(t):
                        break
                    block.append(lines[j])
                    j += 1
                    extra += 1
                break
        key = "".join(strip(x) for x in block)
        if key not in seen:
            seen.add(key)
            blocks.append("".join(block))
        i = j
    return blocks


def section(title):
    print("\n" + "=" * 30 + " " + title + " " + "=" * max(0, 80 - len(title)))


def read(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return f.readlines()


section("env.log")
print("".join(read("env.log")))
tests = read("tests.log")
section("tests.log: failures and errors (pytest --tb=long)")
text = "".join(tests)
for head in ("= FAILURES =", "= ERRORS ="):
    a = text.find(head)
    if a >= 0:
        a = text.rfind("\n", 0, a) + 1
        b = min(x for x in (text.find("short test summary info", a + 10), text.find("= ERRORS =", a + 10),
                            len(text)) if x >= 0)
        b = text.rfind("\n", a, b) + 1 if text.rfind("\n", a, b) > a else b
        print(text[a:b][:200000])
section("tests.log: summary (tail)")
summary_at = text.rfind("short test summary info")
print(text[text.rfind("\n", 0, summary_at) + 1:] if summary_at >= 0 else "".join(tests[-60:]))
for name in ("engine_A.log", "engine_B.log", "engine_C.log"):
    lines = read(name)
    section(f"{name}: diag lines")
    print("".join(l for l in lines if "[diag" in l and "RESULT FAILED" not in l)[:20000])
    blocks = tracebacks(lines)
    section(f"{name}: {len(blocks)} distinct Python traceback(s), in full")
    for k, b in enumerate(blocks):
        print(f"--- traceback {k + 1} ---")
        print(b)
    hits = [l for l in lines if re.search(r"CUDA error|cudaError|capture|Capture|out of memory|Fatal Python", l)]
    section(f"{name}: lines about CUDA errors / capture (last 40)")
    print("".join(hits[-40:]))
    section(f"{name}: tail (last 120 lines)")
    print("".join(lines[-120:]))
bench = read("offload_step.log")
section("offload_step.log (bench_offload_step: main recorded 245 ms/step, GPU 101 ms, 6461 launches, 35 syncs)")
for b in tracebacks(bench):
    print(b)
print("".join(l for l in bench if l.startswith(("{", "[diag")) or "Self CPU time total" in l or "Self CUDA time total" in l))
toks = {}
for v in "ABC":
    p = os.path.join(out, f"tokens_{v}.json")
    if os.path.exists(p):
        toks[v] = json.load(open(p))
section("tokens")
print({v: t for v, t in toks.items()})
if "A" in toks and "C" in toks:
    print("graphs (A) == eager (C):", toks["A"] == toks["C"])
EOF
echo "[diag] done in $(elapsed)s; files under $OUT"
