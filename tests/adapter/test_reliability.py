"""A SparseServe server with offload on must never go down or lose a request (CPU build, tiny model, loopback).

One `vllm serve` process serves every check here, in order: an oversized prompt is refused with a clear HTTP
error while the server keeps serving; streaming and non-streaming clients that disconnect mid-generation give their
pages back; 1,000 short and 20 long concurrent requests (more KV than the host tier holds at once, so requests
wait for memory) all complete; afterwards the page gauges are back to zero and the log holds no error.
"""

import asyncio
import json
import re
import time

import aiohttp
import pytest

from sparseserve_vllm.serve_process import VllmServer

pytestmark = pytest.mark.engine

MAX_LEN = 4096
# Tiny llama: 2 layers x 2 KV heads x 32 dims x K+V x fp32 = 1 KiB per token, so the host tier holds about 8K tokens:
# the 20 long requests (about 1.2K tokens each) cannot all be in memory at once.
HOST_KV_GIB = 0.008
CONFIG = {"sparseserve": {"token_budget": 256, "page_size": 32, "offload": True, "host_kv_gib": HOST_KV_GIB,
                          "hbm_cache_gib": 0.016, "stats_interval_s": 1}}


def gauges(server) -> dict[str, float]:
    text = server.get_text("/metrics")
    return {name: float(re.search(rf"^sparseserve_{name} ([0-9.e+-]+)$", text, re.M).group(1))
            for name in ("hbm_pages_in_use", "host_blocks_in_use")}


def wait_for_zero(server, timeout=30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(server)
        if all(v == 0 for v in g.values()) or time.monotonic() > deadline:
            return g
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    args = ["--attention-backend", "sparseserve", "--additional-config", json.dumps(CONFIG),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_LEN),
            "--kv-cache-memory-bytes", str(64 << 20), "--served-model-name", "tiny", "--max-num-seqs", "64"]
    env = {"SPARSESERVE_STATS_DIR": str(tmp_path_factory.mktemp("stats"))}
    with VllmServer(tiny_model("llama"), args, env=env, timeout_s=600) as s:
        yield s


def words(n: int, seed: int = 0) -> str:
    vocab = ["green", "sky", "blue", "sun", "pass", "key", "cache", "page", "token", "fox"]
    return " ".join(vocab[(i * 7 + seed) % len(vocab)] for i in range(n))


def test_a_prompt_longer_than_the_kv_capacity_is_refused_and_the_server_keeps_serving(server):
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as e:
        server.post("/v1/completions", {"model": "tiny", "prompt": words(MAX_LEN + 500), "max_tokens": 4})
    assert e.value.code == 400
    body = e.value.read().decode()
    assert "maximum context length" in body or "max_model_len" in body or "longer than" in body, body
    ok = server.post("/v1/completions", {"model": "tiny", "prompt": words(50), "max_tokens": 4, "ignore_eos": True})
    assert ok["usage"]["completion_tokens"] == 4


async def _disconnect(url: str, stream: bool) -> None:
    body = {"model": "tiny", "prompt": words(600, 3), "max_tokens": 2000, "ignore_eos": True, "stream": stream}
    async with aiohttp.ClientSession() as session:
        if stream:
            async with session.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200
                n = 0
                async for _ in r.content:
                    n += 1
                    if n >= 5:
                        break  # leave mid-stream: the connection is closed on exit
        else:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=3))


@pytest.mark.parametrize("stream", [True, False])
def test_clients_that_disconnect_give_every_page_back(server, stream):
    asyncio.run(_disconnect(server.url, stream))
    assert wait_for_zero(server) == {"hbm_pages_in_use": 0, "host_blocks_in_use": 0}


async def _load(url: str, n_short: int, n_long: int) -> list[dict]:
    conn = aiohttp.TCPConnector(limit=128)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900)) as session:
        async def one(i: int, long: bool) -> dict:
            body = {"model": "tiny", "prompt": words(500 if long else 12, i), "ignore_eos": True,
                    "max_tokens": 24 if long else 4}
            async with session.post(url + "/v1/completions", json=body) as r:
                return {"status": r.status, "long": long, "body": await r.json()}

        tasks = [one(i, False) for i in range(n_short)] + [one(i, True) for i in range(n_long)]
        return await asyncio.gather(*tasks)


def test_a_thousand_short_and_twenty_long_requests_all_complete(server):
    t0 = time.monotonic()
    results = asyncio.run(_load(server.url, 1000, 20))
    elapsed = time.monotonic() - t0
    assert elapsed < 900
    bad = [r for r in results if r["status"] != 200]
    assert not bad, bad[:3]
    for r in results:
        usage = r["body"]["usage"]
        assert usage["completion_tokens"] == (24 if r["long"] else 4)
        assert r["body"]["choices"][0]["finish_reason"] == "length"
    assert wait_for_zero(server) == {"hbm_pages_in_use": 0, "host_blocks_in_use": 0}
    log = server.log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, server.log_tail()
