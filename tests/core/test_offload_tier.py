"""`OffloadTier` on the CPU (plain host store, a small "HBM" page pool): data lands where the contract says.

A reference KV tensor in the host layout is kept next to the tier; every check compares what the tier returns
(cache pages, gathered context) with the reference, after evictions forced by a pool smaller than the KV. The pool
is poisoned with NaN and has one slot more than the cache manages: the trash page (the last slot).
"""

from __future__ import annotations

import pytest
import torch

from sparseserve_vllm.core.host_kv import HostKVStore
from sparseserve_vllm.core.offload_tier import OffloadTier
from sparseserve_vllm.core.page_cache import CacheCapacityError
import sparseserve_vllm.kernels.flash_h2d as fh

from tests.host_sync import allow_lagged_reads, forbid_host_sync

LAYERS, BLOCKS, HKV, BS, D, PS = 2, 6, 2, 16, 8, 4
PPB = BS // PS


def make_tier(num_slots: int) -> OffloadTier:
    """A tier whose page cache has `num_slots` slots (the pool has one more: the trash page)."""
    host = HostKVStore(LAYERS, BLOCKS, HKV, BS, D, torch.float32, pin=False)
    host.kv.fill_(float("nan"))  # poisoned: anything read before it is written shows up
    pool = torch.full((num_slots + 1, PS, 2 * D), float("nan"))
    return OffloadTier(host=host, cache_pages=pool, page_size=PS, max_tokens=64, d2h_threads=2)


def write_tokens(tier, ref, layer, slots, gen):
    k = torch.randn(len(slots), HKV, D, generator=gen)
    v = torch.randn(len(slots), HKV, D, generator=gen)
    sm = torch.tensor(slots, dtype=torch.long)
    tier.begin_step()
    tier.write_new(layer, k, v, sm)
    tier.save(layer, k, v, sm)
    for t, s in enumerate(slots):
        if s >= 0:
            ref[layer, s // BS, :, s % BS, :D] = k[t]
            ref[layer, s // BS, :, s % BS, D:] = v[t]
    return sm


def ref_page(ref, layer, page):
    b, rest = divmod(page, HKV * PPB)
    h, j = divmod(rest, PPB)
    return ref[layer, b, h, j * PS:(j + 1) * PS]


def test_saved_pages_come_back_after_eviction_and_gather_matches():
    gen = torch.Generator().manual_seed(0)
    tier = make_tier(num_slots=HKV * PPB)  # one block's pages: everything else is evicted on the way
    ref = torch.full((LAYERS, BLOCKS, HKV, BS, 2 * D), float("nan"))
    for layer in range(LAYERS):  # prefill-like writes: whole blocks 1, 3, 4, in chunks, with padding
        for chunk in range(0, 3 * BS, 12):
            slots = [[1, 3, 4][i // BS] * BS + i % BS for i in range(chunk, min(chunk + 12, 3 * BS))]
            write_tokens(tier, ref, layer, slots + [-1, -1], gen)
    tier.flush()
    # Every written page resolves to a slot holding its reference data, one layer at a time.
    for layer in range(LAYERS):
        for block in (1, 3, 4):
            tier.begin_step()
            pages = tier.block_pages(torch.tensor([block])).reshape(-1)
            slots = tier.resolve(layer, torch.cat([pages, torch.tensor([-1])]))
            assert slots[-1] == -1
            for p, s in zip(pages.tolist(), slots[:-1].tolist()):
                torch.testing.assert_close(tier.cache_pages[s], ref_page(ref, layer, p), rtol=0, atol=0)
    st = tier.stats()
    assert st["hbm_evictions"] > 0 and st["hbm_misses"] > 0
    # A request's context (blocks 3, 4 as its block table) with its 2 newest tokens passed in.
    k_new, v_new = torch.randn(2, HKV, D, generator=gen), torch.randn(2, HKV, D, generator=gen)
    length = BS + 10
    k, v = tier.gather_context(1, torch.tensor([3, 4]), length, k_new, v_new)
    want = torch.cat([ref[1, 3], ref[1, 4]], dim=1)[:, :length]
    torch.testing.assert_close(k[:, : length - 2], want[:, : length - 2, :D], rtol=0, atol=0)
    torch.testing.assert_close(v[:, : length - 2], want[:, : length - 2, D:], rtol=0, atol=0)
    torch.testing.assert_close(k[:, length - 2:], k_new.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(v[:, length - 2:], v_new.transpose(0, 1), rtol=0, atol=0)
    tier.close()


def test_write_new_writes_through_and_resident_slots_finds_the_pages():
    gen = torch.Generator().manual_seed(1)
    tier = make_tier(num_slots=3 * HKV * PPB)
    ref = torch.full((LAYERS, BLOCKS, HKV, BS, 2 * D), float("nan"))
    write_tokens(tier, ref, 0, list(range(2 * BS, 2 * BS + PS)), gen)  # fills page 0 of block 2
    tier.flush()
    write_tokens(tier, ref, 0, [2 * BS + PS], gen)  # a decode token: page 1 of block 2, first token
    full_pages = tier.token_pages(torch.tensor([2 * BS + PS - 1])).reshape(-1)
    slots = tier.resident_slots(0, full_pages)
    assert (slots >= 0).all()
    for p, s in zip(full_pages.tolist(), slots.tolist()):
        torch.testing.assert_close(tier.cache_pages[s], ref_page(ref, 0, p), rtol=0, atol=0)
    new_page = tier.token_pages(torch.tensor([2 * BS + PS])).reshape(-1)
    for p, s in zip(new_page.tolist(), tier.resident_slots(0, new_page).tolist()):
        torch.testing.assert_close(tier.cache_pages[s, :1], ref_page(ref, 0, p)[:1], rtol=0, atol=0)
    assert (tier.resident_slots(1, full_pages) == -1).all()  # nothing of layer 1 was written
    tier.close()


def test_free_blocks_gives_every_slot_back():
    gen = torch.Generator().manual_seed(2)
    tier = make_tier(num_slots=4 * HKV * PPB)
    ref = torch.full((LAYERS, BLOCKS, HKV, BS, 2 * D), float("nan"))
    for layer in range(LAYERS):
        write_tokens(tier, ref, layer, list(range(0, 2 * BS)), gen)
    assert tier.stats()["hbm_pages_in_use"] == 2 * LAYERS * HKV * PPB
    pages = tier.free_blocks(torch.tensor([0, 1]))
    assert sorted(pages.tolist()) == list(range(2 * HKV * PPB))
    assert tier.stats()["hbm_pages_in_use"] == 0
    tier.close()


def test_more_pages_than_the_pool_in_one_layer_step_raises_one_step_late():
    gen = torch.Generator().manual_seed(4)
    tier = make_tier(num_slots=HKV * PPB)
    ref = torch.full((LAYERS, BLOCKS, HKV, BS, 2 * D), float("nan"))
    write_tokens(tier, ref, 0, list(range(BS)), gen)  # block 0 fills the cache
    tier.flush()
    tier.begin_layer()  # same step, a new scope: block 0's pages may be evicted, block 2's are protected
    pages = tier.block_pages(torch.tensor([0, 2])).reshape(-1)  # twice the cache
    # Pages of layer 0 are missing in layer 1: half of them get the slots, the rest get none (-1), silently.
    slots = tier.resolve(1, pages)
    assert (slots >= 0).sum().item() == HKV * PPB and sorted(slots[slots >= 0].tolist()) == list(range(HKV * PPB))
    assert (slots[HKV * PPB:] == -1).all()
    k, v = torch.randn(1, HKV, D, generator=gen), torch.randn(1, HKV, D, generator=gen)
    tier.write_new(1, k, v, torch.tensor([3 * BS]))  # block 3's pages get no slot: their token goes to the trash
    assert (tier.resident_slots(1, tier.token_pages(torch.tensor([3 * BS])).reshape(-1)) == -1).all()
    assert not tier.cache_pages[-1, 0].isnan().any()  # the trash page took it
    tier.begin_step()  # the next step starts: the error is snapshotted, not raised
    with pytest.raises(CacheCapacityError, match="enlarge the cache"):
        tier.begin_step()
    tier.begin_step()  # raised once
    tier.close()


def test_begin_step_waits_for_nothing_and_last_stats_lag_a_step():
    """Steady-state step starts read no device values (only the previous start's snapshot): `last_stats` at the
    start of step N are the counters as of the start of step N - 1; a synchronous read in between is newer, and the
    older snapshot does not replace it."""
    gen = torch.Generator().manual_seed(8)
    tier = make_tier(num_slots=2 * HKV * PPB)
    k, v = torch.randn(BS, HKV, D, generator=gen), torch.randn(BS, HKV, D, generator=gen)
    tier.begin_step()
    seen = []
    for block in (1, 2, 3):  # a step writes a block's tokens: HKV * PPB pages each
        tier.write_new(0, k, v, torch.arange(block * BS, (block + 1) * BS))
        with pytest.MonkeyPatch.context() as mp:
            forbid_host_sync(mp)
            allow_lagged_reads(mp)
            tier.begin_step()
        seen.append(tier.last_stats["hbm_pages_in_use"])
    pages = HKV * PPB
    assert seen == [0, pages, 2 * pages]  # as of the previous step start: one step behind
    assert tier.stats()["hbm_pages_in_use"] == 2 * pages  # the third block evicted the first (cache of 2 blocks)
    tier.free_blocks(torch.tensor([2, 3]))
    tier.refresh_stats()  # synchronous: what the runtime does after freeing blocks
    assert tier.last_stats["hbm_pages_in_use"] == 0
    tier.begin_step()  # the pending snapshot (start of step 3: 2 blocks in use) is older: not kept
    assert tier.last_stats["hbm_pages_in_use"] == 0
    tier.write_new(0, k, v, torch.arange(BS, 2 * BS))
    tier.begin_step()  # its own snapshot (0 in use), then ...
    tier.begin_step()  # ... the one after the write
    assert tier.last_stats["hbm_pages_in_use"] == pages
    assert tier.last_stats["hbm_misses"] == tier.stats()["hbm_misses"] == 4 * pages
    tier.close()


def test_padding_writes_only_the_trash_page():
    gen = torch.Generator().manual_seed(5)
    tier = make_tier(num_slots=3 * HKV * PPB)
    ref = torch.full((LAYERS, BLOCKS, HKV, BS, 2 * D), float("nan"))
    write_tokens(tier, ref, 0, [-1, 2 * BS + 1, -1, -1, 2 * BS, -1], gen)
    written = tier.resident_slots(0, tier.token_pages(torch.tensor([2 * BS])).reshape(-1)).tolist()
    assert sorted(written) == list(range(HKV))  # the page of each KV head got the first free slots
    for s in range(tier.trash_slot):
        if s not in written:
            assert tier.cache_pages[s].isnan().all()  # untouched
    for p, s in zip(tier.token_pages(torch.tensor([2 * BS])).reshape(-1).tolist(), written):
        torch.testing.assert_close(tier.cache_pages[s, :2], ref_page(ref, 0, p)[:2], rtol=0, atol=0)
    assert not tier.cache_pages[tier.trash_slot].isnan().all()
    assert tier.stats()["bytes_h2d"] == 0  # a fresh page loads nothing
    tier.close()


@pytest.mark.skipif(not fh._INTERPRET, reason="a CPU pool without TRITON_INTERPRET=1 loads with the torch path, "
                                             "which synchronizes by design")
def test_write_new_and_resolve_call_nothing_that_syncs():
    gen = torch.Generator().manual_seed(6)
    tier = make_tier(num_slots=HKV * PPB)
    ref = torch.full((LAYERS, BLOCKS, HKV, BS, 2 * D), float("nan"))
    write_tokens(tier, ref, 0, list(range(5 * BS, 5 * BS + 6)), gen)  # two pages of block 5 ...
    write_tokens(tier, ref, 0, list(range(BS)), gen)  # ... evicted by block 0
    tier.flush()
    k, v = torch.randn(3, HKV, D, generator=gen), torch.randn(3, HKV, D, generator=gen)
    sm = torch.tensor([5 * BS + 6, -1, 5 * BS + 8])  # a page with older tokens and a fresh one
    ref[0, 5, :, 6, :D], ref[0, 5, :, 6, D:] = k[0], v[0]
    ref[0, 5, :, 8, :D], ref[0, 5, :, 8, D:] = k[2], v[2]
    tier.begin_step()
    with pytest.MonkeyPatch.context() as mp:
        forbid_host_sync(mp)
        # FlashH2D range-checks CPU ids (int(max)); with device ids (CUDA) it checks nothing: stub the CPU check.
        mp.setattr(fh, "_check_id_range", lambda *a: None)
        tier.write_new(0, k, v, sm)
        slots = tier.resolve(0, tier.block_pages(torch.tensor([5])).reshape(-1)[:: PPB])  # page 0 of each head
    pages = tier.token_pages(torch.tensor([5 * BS + 6, 5 * BS + 8])).reshape(-1)
    for p, s in zip(pages.tolist(), tier.resident_slots(0, pages).tolist()):
        valid = 3 if p % PPB == 1 else 1  # page 1: tokens 4..6 (4, 5 loaded back); page 2: token 8 only
        torch.testing.assert_close(tier.cache_pages[s, :valid], ref_page(ref, 0, p)[:valid], rtol=0, atol=0)
    for p, s in zip(tier.block_pages(torch.tensor([5])).reshape(-1)[:: PPB].tolist(), slots.tolist()):
        torch.testing.assert_close(tier.cache_pages[s], ref_page(ref, 0, p), rtol=0, atol=0)
    assert tier.stats()["bytes_h2d"] == 2 * HKV * tier.page_bytes  # page 1 (older tokens) and page 0, not page 2
    tier.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_write_new_and_resolve_do_not_sync():
    host = HostKVStore(LAYERS, BLOCKS, HKV, BS, D, torch.float16, pin=True)
    host.kv.normal_()
    # The 2 x Hkv pages write_new makes resident stay protected in the layer's scope while the 8 pages of blocks
    # 3 and 4 are resolved: the cache must hold 2 x Hkv + 8 = 12 pages (with HKV * PPB = 8 slots, 4 pages got no
    # slot: they read the trash page and the next begin_step raised CacheCapacityError).
    pool = torch.zeros((2 * HKV * PPB + 1, PS, 2 * D), dtype=torch.float16, device="cuda")
    tier = OffloadTier(host=host, cache_pages=pool, page_size=PS, max_tokens=64)
    k = torch.randn(3, HKV, D, dtype=torch.float16, device="cuda")
    sm = torch.tensor([BS + 1, -1, 2 * BS], device="cuda")
    pages = tier.block_pages(torch.tensor([3, 4])).reshape(-1)[::2].contiguous()
    other = tier.block_pages(torch.tensor([5, 0])).reshape(-1)[::2].contiguous()
    for layer in range(LAYERS):
        tier.begin_step()
        # Warm-up with the same shapes (other pages, so that the guarded resolve loads): plans FlashH2D, compiles
        # every kernel variant used below.
        tier.write_new(layer, k, k, sm)
        tier.resolve(layer, other)
        tier.save_inline(layer, k, k, sm)
        tier.begin_step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tier.begin_layer()
            tier.write_new(layer, k, k, sm)
            slots = tier.resolve(layer, pages)
            tier.save(layer, k, k, sm)
            tier.save_inline(layer, k, k, sm)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert (slots >= 0).all(), slots
        want = host.pages(layer, PS)[pages.cpu()]
        torch.testing.assert_close(pool[slots.long()].cpu(), want, rtol=0, atol=0)
    tier.check()  # no deferred error (also none snapshotted by a begin_step and not raised yet)
    tier.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_begin_step_does_not_wait_for_the_step_just_queued():
    """A step start never waits for the work queued since the previous step start; a deferred error is raised once
    the GPU has reached its snapshot, at the latest when `depth` (2) snapshots are in flight (one step start later),
    which then waits for that snapshot only."""
    host = HostKVStore(LAYERS, BLOCKS, HKV, BS, D, torch.float16, pin=True)
    pool = torch.zeros((HKV * PPB + 1, PS, 2 * D), dtype=torch.float16, device="cuda")
    tier = OffloadTier(host=host, cache_pages=pool, page_size=PS, max_tokens=64)
    pages = tier.block_pages(torch.tensor([0, 1])).reshape(-1)  # twice the cache
    tier.begin_step()
    tier.resolve(0, pages[:1])  # warm-up: FlashH2D planned, kernels compiled
    tier.begin_step()
    torch.cuda.synchronize()
    tier.resolve(0, pages)  # HKV * PPB pages get no slot
    torch.cuda._sleep(1_000_000_000)  # about half a second of GPU work: the rest of the step
    busy = torch.cuda.Event()
    busy.record()
    tier.begin_step()  # snapshots the error; the GPU is still in the step
    assert not busy.query(), "begin_step waited for the GPU work queued after the previous step start"
    torch.cuda._sleep(1_000_000_000)
    busy.record()
    tier.begin_step()  # the snapshot with the error is not reached yet: no wait, no error yet
    assert not busy.query(), "begin_step waited for a snapshot while fewer than `depth` were in flight"
    with pytest.raises(CacheCapacityError, match=f"{HKV * PPB} missing page"):
        tier.begin_step()  # two snapshots in flight: waits for the oldest, the one with the error
    assert not busy.query(), "begin_step waited for the GPU work queued after the previous step start"
    tier.check()
    tier.close()


def test_bytes_d2h_counts_the_tokens_saved_by_ring_and_inline_saves():
    gen = torch.Generator().manual_seed(5)
    tier = make_tier(num_slots=2 * HKV * PPB)
    k = torch.randn(4, HKV, D, generator=gen)
    sm = torch.tensor([5, -1, 9, 2 * BS + 1])  # -1: padding, not saved
    tier.begin_step()
    tier.save(0, k, k, sm)  # the ring (eager steps)
    tier.save_inline(1, k, k, sm)  # on the stream (decode steps; on the CPU the scatter kernel counts)
    tier.save_inline(0, k[:2], k[:2], sm[:2])  # a slot saved again counts again
    tier.flush()
    assert tier.stats()["bytes_d2h"] == (3 + 3 + 1) * tier.token_bytes
    tier.close()


def test_write_new_loads_only_pages_with_older_tokens():
    gen = torch.Generator().manual_seed(3)
    tier = make_tier(num_slots=HKV * PPB)
    ref = torch.full((LAYERS, BLOCKS, HKV, BS, 2 * D), float("nan"))
    write_tokens(tier, ref, 0, [5 * BS, 5 * BS + 1], gen)  # two tokens of a fresh page: nothing to load
    assert tier.stats()["bytes_h2d"] == 0
    write_tokens(tier, ref, 0, list(range(0, BS)), gen)  # block 0 fills the pool: block 5's page is evicted
    assert tier.stats()["hbm_evictions"] >= HKV
    tier.flush()
    write_tokens(tier, ref, 0, [5 * BS + 2], gen)  # its third token: the two older ones come back from host
    assert tier.stats()["bytes_h2d"] == HKV * tier.page_bytes
    page = tier.token_pages(torch.tensor([5 * BS + 2])).reshape(-1)
    for p, s in zip(page.tolist(), tier.resident_slots(0, page).tolist()):
        torch.testing.assert_close(tier.cache_pages[s, :3], ref_page(ref, 0, p)[:3], rtol=0, atol=0)
    tier.close()


@pytest.mark.skipif(not fh._INTERPRET, reason="the CPU torch paths of FlashH2D/FlashD2H synchronize by design")
def test_decode_steps_are_sync_free_and_replay_the_same_trace():
    """Decode-only steps as a full CUDA graph runs them: the host does `begin_step` and copies the step's inputs into
    persistent buffers; then, under the graph guard, every layer runs begin_layer, write_new, resolve of the
    selection and save_inline. Each step's data equals the reference (with evictions), and two steps with other
    contents record the same trace (same ops, same frozen Python values, same persistent tensors)."""
    from tests.host_sync import graph_trace

    gen = torch.Generator().manual_seed(7)
    tier = make_tier(num_slots=3 * HKV * PPB)  # one layer's selection fills it: every step evicts the other layer
    ref = torch.full((LAYERS, BLOCKS, HKV, BS, 2 * D), float("nan"))
    tables, lens = [[1, 3], [4, 5]], [20, 18]
    def slot(r, pos):
        return tables[r][pos // BS] * BS + pos % BS

    def valid_tokens(page):  # of a page of one of the requests, at the current lengths
        block, rest = divmod(page, HKV * PPB)
        r = next(r for r, t in enumerate(tables) if block in t)
        return min(PS, lens[r] - (tables[r].index(block) * PPB + rest % PPB) * PS)

    for layer in range(LAYERS):  # prefill through the ring saver
        write_tokens(tier, ref, layer, [slot(r, i) for r, n in enumerate(lens) for i in range(n)], gen)
    rows, max_pages = 3, 2 * PPB  # a padded batch of 3 rows (the last is padding); 8 pages per request and head
    k_buf, v_buf = torch.zeros(rows, HKV, D), torch.zeros(rows, HKV, D)
    sm_buf = torch.full((rows,), -1, dtype=torch.long)
    sel_buf = torch.full((rows * HKV * max_pages,), -1, dtype=torch.long)
    out_buf = torch.zeros(LAYERS, sel_buf.numel(), PS, 2 * D)
    traces = []
    for step in range(3):  # step 0 warms up (plans FlashH2D per layer), as vLLM does before capturing
        k_new, v_new = torch.randn(2, HKV, D, generator=gen), torch.randn(2, HKV, D, generator=gen)
        slots = [slot(r, n) for r, n in enumerate(lens)]
        lens = [n + 1 for n in lens]
        sel = torch.full((rows, HKV, max_pages), -1, dtype=torch.long)
        for r, (t, n) in enumerate(zip(tables, lens)):
            npages = -(-n // PS)
            for p in range(npages):
                sel[r, :, p] = tier.block_pages(torch.tensor([t[p // PPB]]))[0, :, p % PPB]
            for layer in range(LAYERS):
                ref[layer, slots[r] // BS, :, slots[r] % BS] = torch.cat([k_new[r], v_new[r]], -1)
        k_buf[:2], v_buf[:2], sm_buf[:2] = k_new, v_new, torch.tensor(slots)
        sel_buf.copy_(sel.reshape(-1))
        tier.begin_step()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fh, "_check_id_range", lambda *a: None)  # the CPU-only id range check of FlashH2D
            with graph_trace(mp) as ops:
                for layer in range(LAYERS):
                    tier.begin_layer()
                    tier.write_new(layer, k_buf, v_buf, sm_buf)
                    cache_slots = tier.resolve(layer, sel_buf)
                    out_buf[layer] = tier.cache_pages[cache_slots.to(torch.long)]
                    tier.save_inline(layer, k_buf, v_buf, sm_buf)
        traces.append(ops)
        for layer in range(LAYERS):
            for i, page in enumerate(sel_buf.tolist()):
                if page >= 0:
                    valid = valid_tokens(page)
                    torch.testing.assert_close(out_buf[layer, i, :valid], ref_page(ref, layer, page)[:valid], rtol=0, atol=0)
    assert traces[1] == traces[2]
    persistent = {x[1] for op in traces[1] for x in op[1:] if isinstance(x, tuple) and x[0] == "persistent"}
    assert {k_buf.data_ptr(), sm_buf.data_ptr(), sel_buf.data_ptr(), tier.cache_pages.data_ptr()} <= persistent
    st = tier.stats()
    assert st["hbm_evictions"] > 0 and st["hbm_misses"] > 0
    tier.saver.wait_all()
    written = ~ref.isnan()
    torch.testing.assert_close(tier.host.kv[written], ref[written], rtol=0, atol=0)
    tier.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_of_decode_layers_replays_steps_with_evictions():
    """The per-layer decode sequence captured once in a CUDA graph and replayed for later steps (begin_step and the
    inputs copied on the host before each replay) loads, writes and saves exactly as the reference says."""
    host = HostKVStore(LAYERS, BLOCKS, HKV, BS, D, torch.float16, pin=True)
    host.kv.zero_()
    pool = torch.zeros((3 * HKV * PPB + 1, PS, 2 * D), dtype=torch.float16, device="cuda")
    tier = OffloadTier(host=host, cache_pages=pool, page_size=PS, max_tokens=64)
    ref = torch.zeros((LAYERS, BLOCKS, HKV, BS, 2 * D), dtype=torch.float16)
    tables, lens = [[1, 3], [4, 5]], [20, 18]

    def slot(r, pos):
        return tables[r][pos // BS] * BS + pos % BS

    def put(layer, slots, k, v):
        for t, s in enumerate(slots):
            ref[layer, s // BS, :, s % BS] = torch.cat([k[t], v[t]], -1).cpu()

    prefill = [slot(r, i) for r, n in enumerate(lens) for i in range(n)]
    tier.begin_step()
    for layer in range(LAYERS):  # prefill through the ring saver
        k, v = (torch.randn(len(prefill), HKV, D, dtype=torch.float16, device="cuda") for _ in range(2))
        tier.begin_layer()
        tier.write_new(layer, k, v, torch.tensor(prefill, device="cuda"))
        tier.save(layer, k, v, torch.tensor(prefill, device="cuda"))
        put(layer, prefill, k, v)
    rows, max_pages = 3, 2 * PPB
    k_buf, v_buf = (torch.zeros(LAYERS, rows, HKV, D, dtype=torch.float16, device="cuda") for _ in range(2))
    sm_buf = torch.full((rows,), -1, dtype=torch.long, device="cuda")
    sel_buf = torch.full((rows * HKV * max_pages,), -1, dtype=torch.long, device="cuda")
    out_buf = torch.zeros((LAYERS, sel_buf.numel(), PS, 2 * D), dtype=torch.float16, device="cuda")

    def layers():
        for layer in range(LAYERS):
            tier.begin_layer()
            tier.write_new(layer, k_buf[layer], v_buf[layer], sm_buf)
            out_buf[layer] = pool[tier.resolve(layer, sel_buf).to(torch.long)]
            tier.save_inline(layer, k_buf[layer], v_buf[layer], sm_buf)

    graph = None
    for step in range(4):
        slots = [slot(r, n) for r, n in enumerate(lens)]
        lens = [n + 1 for n in lens]
        sel = torch.full((rows, HKV, max_pages), -1, dtype=torch.long)
        for r, (t, n) in enumerate(zip(tables, lens)):
            for p in range(-(-n // PS)):
                sel[r, :, p] = tier.block_pages(torch.tensor([t[p // PPB]]))[0, :, p % PPB].cpu()
        k_buf.normal_(), v_buf.normal_()
        for layer in range(LAYERS):
            put(layer, slots, k_buf[layer], v_buf[layer])
        sm_buf[:2] = torch.tensor(slots, device="cuda")
        sel_buf.copy_(sel.reshape(-1))
        tier.begin_step()
        if step == 0:
            layers()  # warm-up: plans FlashH2D, compiles the kernels
        else:
            if graph is None:
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    layers()
            graph.replay()
        torch.cuda.synchronize()
        got = out_buf.cpu()
        for layer in range(LAYERS):
            for i, page in enumerate(sel_buf.tolist()):
                if page >= 0:
                    block, rest = divmod(page, HKV * PPB)
                    r = next(r for r, t in enumerate(tables) if block in t)
                    valid = min(PS, lens[r] - (tables[r].index(block) * PPB + rest % PPB) * PS)
                    torch.testing.assert_close(got[layer, i, :valid], ref_page(ref, layer, page)[:valid], rtol=0, atol=0)
    assert tier.stats()["hbm_evictions"] > 0
    tier.saver.wait_all()
    written = ref != 0
    torch.testing.assert_close(host.kv[written], ref[written], rtol=0, atol=0)
    tier.close()
