"""FlashD2HSaver: after wait_all the host store equals a reference written by plain Python loops.

Both modes run where they can: "staged" everywhere (on the CPU a plain staging copy, on CUDA a side-stream D2H
copy), "uva" (the GPU scatters into the pinned store, `kernels.flash_d2h_scatter`) only with CUDA; that kernel
itself is tested on the CPU under the Triton interpreter in tests/kernels/test_flash_d2h_scatter.py.
The scatters are held back (threads sleep, or the side stream runs a GPU sleep) so that they finish late and out
of order, which a missing wait (ring reuse, ordering of saves of one layer, flush) turns into wrong data.
"""

from __future__ import annotations

import itertools
import random
import time

import pytest
import torch

from sparseserve_vllm.core import flash_d2h
from sparseserve_vllm.core.flash_d2h import MODES, FlashD2HSaver
from sparseserve_vllm.core.host_kv import HostKVStore
from sparseserve_vllm.kernels.flash_d2h_scatter import FlashD2HScatter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = -1024.0
NEEDS_CUDA = pytest.mark.skipif(DEVICE != "cuda", reason="uva mode needs a CUDA device")
ALL_MODES = [pytest.param(m, marks=NEEDS_CUDA) if m == "uva" else m for m in MODES]


def make_store(dtype, layers=3, blocks=10, heads=2, block_size=8, d=4):
    store = HostKVStore(layers, blocks, heads, block_size, d, dtype, DEVICE == "cuda")
    store.kv.fill_(SENTINEL)
    return store


def random_slots(t, capacity, gen, pad):
    """`t` distinct logical slots with `pad` of them replaced by -1 (padding) at random positions."""
    slots = torch.randperm(capacity, generator=gen)[:t]
    slots[torch.randperm(t, generator=gen)[:pad]] = -1
    return slots


def reference_save(ref, layer, key, value, slots, block_size):
    """The contract, written element by element."""
    d = key.shape[-1] if value is not None else key.shape[-1] // 2
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        for h in range(key.shape[1]):
            kv = key[t, h].tolist() + value[t, h].tolist() if value is not None else key[t, h].tolist()
            for i in range(2 * d):
                ref[layer, s // block_size, h, s % block_size, i] = kv[i]


def hold_back(monkeypatch, mode, should_wait):
    """Delay the scatters whose first ring row r has `should_wait(r)` (staged: threads sleep 1-5 ms) or every
    scatter launch for which `should_wait(launch number)` (uva: ~5 ms GPU sleep on the side stream before it)."""
    rng = random.Random(0)
    if mode == "staged":
        scatter = FlashD2HSaver._scatter

        def delayed(self, copied, layers, start, a, b, deps):
            if should_wait(start + a):
                time.sleep(0.001 + 0.004 * rng.random())
            scatter(self, copied, layers, start, a, b, deps)

        monkeypatch.setattr(FlashD2HSaver, "_scatter", delayed)
    else:
        run = FlashD2HScatter.run
        launches = itertools.count()

        def delayed(self, src, slots, layer, saved=None):
            if should_wait(next(launches)):
                torch.cuda._sleep(int(1e7 * (1 + rng.random())))  # on the current (side) stream
            run(self, src, slots, layer, saved=saved)

        monkeypatch.setattr(FlashD2HScatter, "run", delayed)


STAGED_SETTINGS = [(1 << 20, 1), (1 << 20, 1 << 30), (1, 1), (1, 1 << 30)]  # (min_task_bytes, commit_bytes)
SETTINGS = [pytest.param("staged", m, c, id=f"staged-task{m}-commit{c}") for m, c in STAGED_SETTINGS] + [
    pytest.param("uva", 1 << 20, c, id=f"uva-commit{c}", marks=NEEDS_CUDA) for c in (1, 1 << 30)]


# commit_bytes 1: one piece per save; 1 << 30: saves of several layers per piece.
# min_task_bytes (staged) 1 << 20: one scatter task per piece; 1: several per piece.
@pytest.mark.parametrize("mode,min_task_bytes,commit_bytes", SETTINGS)
@pytest.mark.parametrize(
    "dtype,max_tokens,staging_tokens,num_threads",
    [(torch.bfloat16, 64, None, 2), (torch.float32, 5, 7, 3), (torch.float16, 7, 7, 4), (torch.float32, 16, 40, 2)],
)
def test_overlapping_steps_match_python_reference(dtype, max_tokens, staging_tokens, num_threads, mode,
                                                  min_task_bytes, commit_bytes, monkeypatch):
    monkeypatch.setattr(flash_d2h, "_MIN_TASK_BYTES", min_task_bytes)
    monkeypatch.setattr(flash_d2h, "_COMMIT_BYTES", commit_bytes)
    hold_back(monkeypatch, mode, lambda i: i % 3 == 0)  # scatters finish late and out of order
    gen = torch.Generator().manual_seed(int(max_tokens * 10 + num_threads))
    store = make_store(dtype)
    ref = store.kv.double().clone()
    capacity = store.num_tokens
    with FlashD2HSaver(store, max_tokens, num_threads, staging_tokens=staging_tokens, device=DEVICE, mode=mode,
                       num_sms=3) as saver:
        assert saver.mode == mode
        for step in range(4):  # no flush between steps: saves of several steps and layers overlap
            for layer in range(store.num_layers):
                t = int(torch.randint(1, 30, (1,), generator=gen))
                slots = random_slots(t, capacity, gen, pad=t // 4)
                # later steps rewrite some slots of earlier steps (a freed block reused): the later save wins
                key = torch.randn((t + 2, 2, 4), generator=gen).to(dtype)  # 2 padded rows past T are ignored
                value = torch.randn((t + 2, 2, 4), generator=gen).to(dtype)
                reference_save(ref, layer, key[:t], value[:t], slots, store.block_size)
                k, v = key.to(DEVICE), value.to(DEVICE)
                saver.save(layer, k, v, slots.to(DEVICE))
                k.fill_(float("nan")), v.fill_(float("nan"))  # the caller's buffers are reused after save
        saver.wait_all()
        assert torch.equal(store.kv.double(), ref)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_packed_kv_and_int32_cpu_slot_mapping(mode):
    gen = torch.Generator().manual_seed(11)
    store = make_store(torch.bfloat16)
    ref = store.kv.double().clone()
    saver = FlashD2HSaver(store, max_tokens=8, num_threads=2, device=DEVICE, mode=mode)
    for layer in (2, 0):
        slots = random_slots(20, store.num_tokens, gen, pad=3).to(torch.int32)
        kv = torch.randn((20, 2, 8), generator=gen).to(torch.bfloat16)
        reference_save(ref, layer, kv, None, slots, store.block_size)
        saver.save(layer, kv.to(DEVICE), None, slots)  # slot ids may stay on the CPU
    slots = random_slots(6, store.num_tokens, gen, pad=1)
    key = torch.randn((6, 2, 4), generator=gen).to(torch.bfloat16)  # exactly T rows, value has one more
    value = torch.randn((7, 2, 4), generator=gen).to(torch.bfloat16)
    reference_save(ref, 1, key, value[:6], slots, store.block_size)
    saver.save(1, key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE))
    saver.wait_all()
    assert torch.equal(store.kv.double(), ref)
    saver.close()
    saver.close()  # idempotent


@pytest.mark.parametrize("mode", ALL_MODES)
def test_same_slot_saved_many_times_keeps_the_last(mode, monkeypatch):
    """Every other save's scatter is held back; saves of one layer must still land in order."""
    monkeypatch.setattr(flash_d2h, "_MIN_TASK_BYTES", 1)
    monkeypatch.setattr(flash_d2h, "_COMMIT_BYTES", 1)  # one piece (uva: one launch) per save
    hold_back(monkeypatch, mode, lambda i: (i // 7) % 2 == 0 if mode == "staged" else i % 2 == 0)
    store = make_store(torch.float32, layers=1)
    with FlashD2HSaver(store, max_tokens=7, num_threads=8, staging_tokens=28, device=DEVICE, mode=mode) as saver:
        slots = torch.tensor([5, 17, 40, 63, 2, 33, 9])
        for i in range(12):
            kv = torch.full((7, 2, 8), float(i))
            kv[:, :, 0] = torch.arange(7, dtype=torch.float32)[:, None]
            saver.save(0, kv.to(DEVICE), None, slots.to(DEVICE))
    for t, s in enumerate(slots.tolist()):
        row = store.kv[0, s // 8, :, s % 8]
        assert (row[:, 0] == t).all() and (row[:, 1:] == 11.0).all()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_flush_makes_saves_visible_to_the_next_work_on_the_stream(mode, monkeypatch):
    """What a FlashH2D load queued after flush() reads: a device copy of the store on the current stream."""
    hold_back(monkeypatch, mode, lambda i: True)
    store = make_store(torch.float16)

    def saves(saver):
        gen = torch.Generator().manual_seed(5)
        ref = store.kv.double().clone()
        for layer in range(store.num_layers):
            slots = random_slots(12, store.num_tokens, gen, pad=2)
            kv = torch.randn((12, 2, 8), generator=gen).half()
            reference_save(ref, layer, kv, None, slots, store.block_size)
            saver.save(layer, kv.to(DEVICE), None, slots.to(DEVICE))
        return ref

    with FlashD2HSaver(store, max_tokens=16, num_threads=2, device=DEVICE, mode=mode) as saver:
        saves(saver)  # warm-up: the first uva launch of a shape compiles the kernel, which outlasts the GPU sleep
    store.kv.fill_(SENTINEL)
    saver = FlashD2HSaver(store, max_tokens=16, num_threads=2, device=DEVICE, mode=mode)
    ref = saves(saver)
    saver.flush()
    if mode == "uva":
        assert not saver._stream.query()  # flush did not wait for the (held back) scatter on the host
    loaded = store.kv.to(DEVICE, non_blocking=True)  # queued on the current stream after flush()
    assert torch.equal(loaded.double().cpu(), ref)
    saver.close()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_empty_and_all_padding_saves_change_nothing(mode):
    store = make_store(torch.float32)
    with FlashD2HSaver(store, max_tokens=4, num_threads=1, device=DEVICE, mode=mode) as saver:
        saver.save(0, torch.zeros((0, 2, 4), device=DEVICE), torch.zeros((0, 2, 4), device=DEVICE),
                   torch.zeros(0, dtype=torch.int64, device=DEVICE))
        saver.save(1, torch.ones((6, 2, 4), device=DEVICE), torch.ones((6, 2, 4), device=DEVICE),
                   torch.full((6,), -1, dtype=torch.int64, device=DEVICE))
    assert (store.kv == SENTINEL).all()


@pytest.mark.skipif(DEVICE != "cuda", reason="slot ids on the CPU are checked in save(); device ones only later")
@pytest.mark.parametrize("mode", MODES)
def test_device_slot_beyond_the_store_raises_in_wait_all(mode):
    store = make_store(torch.float32)
    saver = FlashD2HSaver(store, max_tokens=4, num_threads=1, device=DEVICE, mode=mode)
    k = torch.ones((3, 2, 4), device=DEVICE)
    saver.save(0, k, k, torch.tensor([0, 80, 1], device=DEVICE))
    if mode == "uva":
        saver.flush()  # never raises: it does not wait
    with pytest.raises(ValueError, match="slot_mapping must be < 80"):
        saver.wait_all()
    if mode == "uva":
        assert (store.kv[0, 0, :, :2] == 1).all()  # the kernel skipped only the bad token
    saver.close()  # the error was reported once


def test_default_mode_and_bad_mode():
    store = make_store(torch.float32)
    with FlashD2HSaver(store, max_tokens=4, num_threads=1) as saver:
        assert saver.mode == ("uva" if DEVICE == "cuda" else "staged")
    with pytest.raises(ValueError, match=r"mode must be one of \('uva', 'staged'\)"):
        FlashD2HSaver(store, max_tokens=4, mode="gpu")
    with pytest.raises(ValueError, match="mode 'uva' needs a CUDA device"):
        FlashD2HSaver(store, max_tokens=4, device="cpu", mode="uva")
    with pytest.raises(ValueError, match="num_sms"):
        FlashD2HSaver(store, max_tokens=4, num_sms=0)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_bad_arguments_name_the_argument(mode):
    store = make_store(torch.float32)
    saver = FlashD2HSaver(store, max_tokens=4, num_threads=1, device=DEVICE, mode=mode)
    k = torch.zeros((3, 2, 4), device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="layer"):
        saver.save(3, k, k, slots)
    with pytest.raises(ValueError, match="key must be"):
        saver.save(0, torch.zeros((3, 3, 4), device=DEVICE), k, slots)
    with pytest.raises(ValueError, match="value must be"):
        saver.save(0, k, torch.zeros((2, 2, 4), device=DEVICE), slots)
    with pytest.raises(ValueError, match="key dtype"):
        saver.save(0, k.half(), k, slots)
    with pytest.raises(ValueError, match="slot_mapping must be a 1-D"):
        saver.save(0, k, k, slots.float())
    with pytest.raises(ValueError, match="slot_mapping must be < 80"):
        saver.save(0, k, k, torch.tensor([0, 80, 1]))
    with pytest.raises(ValueError, match="max_tokens"):
        FlashD2HSaver(store, max_tokens=0, num_threads=1)
    with pytest.raises(ValueError, match="staging_tokens"):
        FlashD2HSaver(store, max_tokens=8, num_threads=1, staging_tokens=7)
    with pytest.raises(ValueError, match="host"):
        FlashD2HSaver(store.kv, max_tokens=4, num_threads=1)
    saver.close()
    with pytest.raises(ValueError, match="close"):
        saver.save(0, k, k, slots)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_inline_saves_interleave_with_ring_saves_and_are_sync_free(mode, monkeypatch):
    """Decode-step saves on the current stream (`save_inline`) between ring saves of the same slots, whose scatters
    are held back: every later save wins; the inline path calls nothing that synchronizes; and slot ids beyond the
    store are skipped and reported by wait_all."""
    from tests.host_sync import forbid_host_sync

    hold_back(monkeypatch, mode, lambda i: True)
    gen = torch.Generator().manual_seed(12)
    store = make_store(torch.float16)
    ref = store.kv.double().clone()
    with FlashD2HSaver(store, max_tokens=16, num_threads=2, device=DEVICE, mode=mode, num_sms=2) as saver:
        for step in range(3):
            slots = random_slots(12, store.num_tokens, gen, pad=2)
            for layer, inline in itertools.product(range(store.num_layers), (False, True)):
                key = torch.randn((13, 2, 4), generator=gen).to(torch.float16)
                value = torch.randn((13, 2, 4), generator=gen).to(torch.float16)
                reference_save(ref, layer, key[:12], value[:12], slots, store.block_size)
                k, v, s = key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE)
                if inline:
                    saver.flush()  # what the step's start does; the inline save itself must not sync
                    with monkeypatch.context() as mp:
                        forbid_host_sync(mp)
                        saver.save_inline(layer, k, v, s)
                else:
                    saver.save(layer, k, v, s)
        saver.wait_all()
        assert torch.equal(store.kv.double(), ref)
        bad = torch.tensor([store.num_tokens + 3, 0], device=DEVICE)
        saver.save_inline(0, torch.zeros((2, 2, 4), dtype=torch.float16, device=DEVICE),
                          torch.zeros((2, 2, 4), dtype=torch.float16, device=DEVICE), bad)
        with pytest.raises(ValueError, match="1 token"):
            saver.wait_all()


def block_slots(ids, block_size):
    return (torch.as_tensor(ids)[:, None] * block_size + torch.arange(block_size)).reshape(-1)


# min_copy_bytes: 0 = every run by one copy; 2 blocks = runs of >= 2 blocks copied, single blocks through the ring;
# 1 << 30 = every block through the ring. Store blocks hold 2 heads x 8 tokens x 8 elements of 4 bytes = 512 B.
@pytest.mark.parametrize("min_copy_bytes", [0, 1024, 1 << 30])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_save_blocks_interleaved_with_ring_saves_match_python_reference(mode, min_copy_bytes, monkeypatch):
    """Whole-block saves (shuffled ids: runs of several blocks and single ones) between ring saves of the same
    slots, whose scatters are held back: every later save wins, packed KV too, rows past the blocks ignored."""
    monkeypatch.setattr(flash_d2h, "_COMMIT_BYTES", 1)
    hold_back(monkeypatch, mode, lambda i: True)
    gen = torch.Generator().manual_seed(min_copy_bytes % 97)
    store = make_store(torch.float32, blocks=12)
    ref = store.kv.double().clone()
    bs = store.block_size
    with FlashD2HSaver(store, max_tokens=16, num_threads=2, device=DEVICE, mode=mode, num_sms=2,
                       min_copy_bytes=min_copy_bytes) as saver:
        for step in range(3):
            for layer in range(store.num_layers):
                slots = random_slots(10, store.num_tokens, gen, pad=2)
                kv = torch.randn((10, 2, 8), generator=gen)
                reference_save(ref, layer, kv, None, slots, bs)
                saver.save(layer, kv.to(DEVICE), None, slots.to(DEVICE))
                ids = [3, 4, 5, 9, 0, 1, 7][step:] + [10 + step % 2]  # runs [0,1], [3..5], singles
                random.Random(step * 3 + layer).shuffle(ids)
                t = len(ids) * bs
                packed = layer == 1
                key = torch.randn((t + 3, 2, 8 if packed else 4), generator=gen)
                value = None if packed else torch.randn((t + 3, 2, 4), generator=gen)
                reference_save(ref, layer, key[:t], None if packed else value[:t], block_slots(ids, bs), bs)
                k, v = key.to(DEVICE), None if packed else value.to(DEVICE)
                saver.save_blocks(layer, k, v, ids if layer else torch.tensor(ids))
                k.fill_(float("nan"))  # the caller's buffers are reused after save_blocks
        saver.flush()
        loaded = store.kv.to(DEVICE, non_blocking=True)  # queued on the current stream after flush()
        assert torch.equal(loaded.double().cpu(), ref)
        saver.wait_all()
        assert torch.equal(store.kv.double(), ref)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_save_blocks_bad_arguments_name_the_argument(mode):
    store = make_store(torch.float32)
    saver = FlashD2HSaver(store, max_tokens=4, num_threads=1, device=DEVICE, mode=mode)
    k = torch.zeros((16, 2, 4), device=DEVICE)
    with pytest.raises(ValueError, match=r"block_ids must be in \[0, 10\)"):
        saver.save_blocks(0, k, k, [2, 10])
    with pytest.raises(ValueError, match="distinct"):
        saver.save_blocks(0, k, k, [2, 2])
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        saver.save_blocks(0, k, k, [[1, 2]])
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="block_ids must be on the CPU"):
            saver.save_blocks(0, k, k, torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(ValueError, match=r"key must be \[>= 24"):
        saver.save_blocks(0, k, k, [1, 2, 3])
    with pytest.raises(ValueError, match="min_copy_bytes"):
        FlashD2HSaver(store, max_tokens=4, min_copy_bytes=-1)
    saver.save_blocks(0, k, k, [])  # nothing to save
    saver.close()
    assert (store.kv == SENTINEL).all()
