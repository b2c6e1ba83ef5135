"""`vllm serve MODEL --attention-backend sparseserve` answers over HTTP, and it is SparseServe that ran."""

import re

import pytest

from sparseserve_vllm.serve_process import VllmServer
from sparseserve_vllm.prompts import long_prompt

pytestmark = pytest.mark.engine


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_vllm_serve_completion_runs_the_sparseserve_backend(tiny_model, tmp_path):
    args = [
        "--attention-backend", "sparseserve",
        "--additional-config", '{"sparseserve": {"token_budget": 256, "page_size": 32, "stats_interval_s": 1}}',
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
        "--kv-cache-memory-bytes", str(256 << 20), "--served-model-name", "tiny",
    ]
    env = {"SPARSESERVE_STATS_DIR": str(tmp_path / "stats")}
    with VllmServer(tiny_model("llama"), args, env=env, timeout_s=600) as server:
        out = server.post("/v1/completions", {"model": "tiny", "prompt": long_prompt(0, 600), "max_tokens": 16,
                                              "temperature": 0, "ignore_eos": True})
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 16 and out["usage"]["prompt_tokens"] > 256
        import time

        time.sleep(1.5)  # counters are published twice a second
        text = server.get_text("/metrics")
        log = server.log_path.read_text()
    # 2 layers x 15 decode steps, each scoring pages beyond the budget: sparse selection really ran.
    assert metric(text, "sparseserve_decode_steps_total") >= 2 * 15
    assert metric(text, "sparseserve_pages_selected_total") < metric(text, "sparseserve_pages_scored_total")
    assert "Traceback" not in log and "ERROR" not in log
