"""Shared test fixtures: built-in models and real vLLM engines (CPU build) started with small KV pools."""

from __future__ import annotations

import contextlib
import gc
import os
import time

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (vLLM imports it), so kernel tests on a machine without a
# GPU need it set before anything else; `engine()` and `VllmServer` keep it away from vLLM's own processes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Small KV pools and quiet logs for every engine the tests start (inherited by vLLM's spawned processes).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ENGINE_KW = dict(
    dtype="float32",
    enforce_eager=True,
    gpu_memory_utilization=0.3,
    kv_cache_memory_bytes=512 << 20,
    seed=0,
)


@pytest.fixture(scope="session")
def smollm2():
    from sparseserve_vllm.models import smollm2_dir

    return str(smollm2_dir())


@pytest.fixture(scope="session")
def tiny_model():
    from sparseserve_vllm.models import tiny_model_dir

    return lambda family="llama", **kw: str(tiny_model_dir(family, **kw))


@contextlib.contextmanager
def engine(model: str, backend: str | None, sparseserve: dict | None = None, **kw):
    """A real in-process `vllm.LLM` on the CPU build; shut down on exit."""
    from vllm import LLM

    args = dict(ENGINE_KW)
    args.update(kw)
    if sparseserve is not None:
        args["additional_config"] = {"sparseserve": sparseserve}
    # tests/kernels sets TRITON_INTERPRET=1 for this process; vLLM's engine processes must not inherit it.
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        llm = LLM(model=model, attention_backend=backend, **args)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def abort_and_drain(eng, request_id: str) -> dict[str, int]:
    """Abort a request of `eng` (an `LLMEngine`), step until nothing is left and the workers heard of the abort;
    the plugin's statistics totals then (after the workers' next publication)."""
    from sparseserve_vllm import stats

    eng.abort_request([request_id])
    while eng.has_unfinished_requests():
        eng.step()
    eng.step()  # the step that tells the workers which requests ended
    time.sleep(1.2)  # the workers publish their counters twice a second
    return stats.read_totals()


def greedy(llm, prompts, max_tokens: int = 12):
    """Greedy token ids; prompts are token-id lists or strings."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
    outs = llm.generate(inputs, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
