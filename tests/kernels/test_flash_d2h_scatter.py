"""FlashD2H scatter (Triton UVA row scatter into the host store, and its torch path) against a float64 reference.

Without CUDA the kernel runs under TRITON_INTERPRET=1 with CPU tensors on both sides (set by conftest.py before
the kernel module is imported); with CUDA the store is pinned host memory and the rows and ids are on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sparseserve_vllm.kernels import flash_d2h_scatter as fs  # noqa: E402

from .conftest import DEVICE  # noqa: E402

SENTINEL = -1024.0  # exactly representable in every float dtype here; randn data never equals it


def make_store(layers, blocks, heads, block_size, width, dtype, offset_elems=0):
    """Poisoned host store (pinned under CUDA); `offset_elems` shifts its base to test an unaligned store."""
    n = layers * blocks * heads * block_size * width
    flat = torch.full((n + offset_elems,), SENTINEL, dtype=dtype, pin_memory=DEVICE == "cuda")
    return flat[offset_elems:].view(layers, blocks, heads, block_size, width)


def make_slots(t, num_tokens, gen, pad, out_of_range=0, prefill=False, block_size=1):
    """`t` distinct slots (a run of whole blocks when `prefill`), `pad` set to -1 or -5, `out_of_range` >= num_tokens."""
    if prefill:
        blocks = torch.randperm(num_tokens // block_size, generator=gen)[: -(-t // block_size)]
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:t]
    else:
        slots = torch.randperm(num_tokens, generator=gen)[:t]
    picks = torch.randperm(t, generator=gen)[: pad + out_of_range].tolist()
    for i, p in enumerate(picks):
        slots[p] = (-1 if i % 2 else -5) if i < pad else num_tokens + i
    return slots


def reference(store, src, slots, layers):
    """The contract with Python loops, in float64; returns (expected store, tokens expected to be counted)."""
    out = store.double().cpu().clone()
    num_layers, num_blocks, heads, bs, _ = store.shape
    src = src.double().cpu()
    counted = 0
    for t, (s, lay) in enumerate(zip(slots.tolist(), layers)):
        if s < 0:
            continue
        if s >= num_blocks * bs or not 0 <= lay < num_layers:
            counted += 1
            continue
        for h in range(heads):
            out[lay, s // bs, h, s % bs] = src[t, h]
    return out, counted


CASES = [
    # (layers, blocks, heads, block_size, width=2D, dtype, tile_bytes, offset_elems, T, extra src rows, geometry)
    (3, 6, 2, 8, 16, torch.bfloat16, 128, 0, 20, 0, dict(WORD_BYTES=8, ROW_WORDS=4, TOKENS=4)),
    (2, 5, 3, 4, 8, torch.float32, 16384, 0, 14, 3, dict(WORD_BYTES=8, ROW_WORDS=4, TOKENS=512)),
    (2, 4, 2, 8, 12, torch.float16, 64, 0, 17, 0, dict(WORD_BYTES=8, ROW_WORDS=3, ROW_BLOCK=4, TOKENS=2)),  # tail mask
    (2, 4, 2, 4, 6, torch.float16, 16, 0, 9, 1, dict(WORD_BYTES=4, ROW_WORDS=3, ROW_BLOCK=4, TOKENS=1)),  # row > tile
    (2, 6, 1, 8, 8, torch.bfloat16, 256, 1, 11, 0, dict(WORD_BYTES=2, DST_ALIGNED=False)),  # unaligned store base
    (1, 3, 4, 16, 256, torch.bfloat16, 16384, 0, 40, 0, dict(WORD_BYTES=8, ROW_WORDS=64, TOKENS=32)),  # D = 128
]


@pytest.mark.parametrize("per_row_layer", [False, True])
@pytest.mark.parametrize("num_sms", [1, 3, 64])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_float64_reference(case, num_sms, per_row_layer):
    layers, blocks, heads, bs, width, dtype, tile_bytes, offset, t, extra, geometry = case
    gen = torch.Generator().manual_seed(100 * num_sms + 10 * CASES.index(case) + per_row_layer)
    store = make_store(layers, blocks, heads, bs, width, dtype, offset)
    num_tokens = blocks * bs
    if per_row_layer:  # each layer gets its own distinct slots; a slot id may repeat across layers
        lay = torch.randint(0, layers, (t,), generator=gen)
        slots = torch.empty(t, dtype=torch.int64)
        for layer in range(layers):
            rows = (lay == layer).nonzero().flatten()
            if rows.numel():
                slots[rows] = make_slots(rows.numel(), num_tokens, gen, pad=0)
        lay[torch.randperm(t, generator=gen)[:2]] = torch.tensor([-1, layers])  # out of range: skipped, counted
        slots[torch.randperm(t, generator=gen)[:3]] = torch.tensor([-1, -3, num_tokens])
        layer_arg, layer_list = lay.to(torch.int32), lay.tolist()
    else:
        slots = make_slots(t, num_tokens, gen, pad=3, out_of_range=2, prefill=case[3] * 2 <= t, block_size=bs)
        layer_arg = layers - 1
        layer_list = [layer_arg] * t
    src = torch.randn((t + extra, heads, width), generator=gen).to(dtype)
    expected, counted = reference(store, src, slots, layer_list)
    assert counted > 0  # the case exercises the out-of-range path

    op = fs.FlashD2HScatter(num_sms=num_sms, tile_bytes=tile_bytes).plan(store, DEVICE)
    for key, value in geometry.items():  # the case exercises the kernel path it is meant to
        assert op.geometry[key] == value, (key, op.geometry)
    layer_arg = layer_arg.to(DEVICE) if per_row_layer else layer_arg
    saved = torch.full((1,), 1000, dtype=torch.int64, device=DEVICE)  # a running counter: the kernel adds to it
    op.run(src.to(DEVICE), slots.to(DEVICE, torch.int32 if num_sms == 3 else torch.int64), layer_arg, saved=saved)
    assert op.take_out_of_range() == counted
    assert op.take_out_of_range() == 0  # reset
    assert saved.item() == 1000 + int((slots >= 0).sum()) - counted  # the tokens written
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(store.double(), expected)


@settings(max_examples=12, deadline=None)
@given(
    t=st.integers(0, 24),
    heads=st.integers(1, 3),
    block_size=st.sampled_from([1, 4, 8]),
    half_width=st.integers(1, 9),
    tile_bytes=st.sampled_from([16, 64, 1024]),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_shapes(t, heads, block_size, half_width, tile_bytes, seed):
    gen = torch.Generator().manual_seed(seed)
    layers, blocks = 2, 7
    store = make_store(layers, blocks, heads, block_size, 2 * half_width, torch.float16)
    t = min(t, blocks * block_size)
    slots = make_slots(t, blocks * block_size, gen, pad=t // 3) if t else torch.zeros(0, dtype=torch.int64)
    src = torch.randn((t, heads, 2 * half_width), generator=gen).half()
    expected, _ = reference(store, src, slots, [1] * t)
    op = fs.FlashD2HScatter(num_sms=2, tile_bytes=tile_bytes).plan(store, DEVICE)
    saved = torch.zeros((), dtype=torch.int64, device=DEVICE)
    op.run(src.to(DEVICE), slots.to(DEVICE), 1, saved=saved)
    assert op.take_out_of_range() == 0
    assert saved.item() == int((slots >= 0).sum())
    assert torch.equal(store.double(), expected)


@pytest.mark.parametrize("per_row_layer", [False, True])
def test_torch_path_matches_reference_and_raises_out_of_range(per_row_layer):
    gen = torch.Generator().manual_seed(7)
    store = make_store(3, 5, 2, 4, 8, torch.bfloat16)
    slots = make_slots(12, 20, gen, pad=3)
    lay = torch.randint(0, 3, (12,), generator=gen) if per_row_layer else None
    if per_row_layer:  # distinct slots overall, so no (layer, slot) repeats
        layer_arg, layer_list = lay.to(DEVICE), lay.tolist()
    else:
        layer_arg, layer_list = 2, [2] * 12
    src = torch.randn((13, 2, 8), generator=gen).bfloat16()
    expected, counted = reference(store, src, slots, layer_list)
    assert counted == 0
    assert fs.flash_d2h_scatter_torch(store, src.to(DEVICE), slots.to(DEVICE), layer_arg) is store
    assert torch.equal(store.double(), expected)
    bad = slots.clone()
    bad[0] = 20
    with pytest.raises(ValueError, match="slots must be < 20"):
        fs.flash_d2h_scatter_torch(store, src, bad, 0)
    if per_row_layer:
        bad_lay = torch.where(slots >= 0, 3, lay)
        with pytest.raises(ValueError, match="layer values must be in"):
            fs.flash_d2h_scatter_torch(store, src, slots, bad_lay)


def test_bad_arguments_name_the_argument():
    store = make_store(2, 4, 2, 4, 8, torch.float32)
    op = fs.FlashD2HScatter(num_sms=2)
    src = torch.zeros((3, 2, 8), device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="call plan"):
        op.run(src, slots, 0)
    with pytest.raises(ValueError, match="num_sms"):
        fs.FlashD2HScatter(num_sms=0)
    with pytest.raises(ValueError, match="tile_bytes"):
        fs.FlashD2HScatter(tile_bytes=100)
    with pytest.raises(ValueError, match="num_warps"):
        fs.FlashD2HScatter(num_warps=3)
    with pytest.raises(ValueError, match="host_kv must be a 5-D"):
        op.plan(store[0], DEVICE)
    with pytest.raises(ValueError, match="host_kv must be C-contiguous"):
        op.plan(store.transpose(3, 2), DEVICE)
    with pytest.raises(ValueError, match="device"):
        op.plan(store, "meta")
    op.plan(store, DEVICE)
    with pytest.raises(ValueError, match="src must be"):
        op.run(torch.zeros((3, 3, 8), device=DEVICE), slots, 0)
    with pytest.raises(ValueError, match="src must be"):
        op.run(torch.zeros((2, 2, 8), device=DEVICE), slots, 0)  # fewer rows than slots
    with pytest.raises(ValueError, match="src dtype"):
        op.run(src.half(), slots, 0)
    with pytest.raises(ValueError, match="src must be contiguous"):
        op.run(torch.zeros((3, 8, 2), device=DEVICE).transpose(1, 2), slots, 0)
    with pytest.raises(ValueError, match="slots must be a 1-D"):
        op.run(src, slots.float(), 0)
    with pytest.raises(ValueError, match="layer must be an integer"):
        op.run(src, slots, 2)
    with pytest.raises(ValueError, match="layer must be an int or a 1-D"):
        op.run(src, slots, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="src must start"):
        op.run(torch.zeros(3 * 16 + 1, device=DEVICE)[1:].view(3, 2, 8), slots, 0)
    with pytest.raises(ValueError, match="saved must be None or an int64 tensor of one element"):
        op.run(src, slots, 0, saved=torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="saved must be None or an int64 tensor of one element"):
        op.run(src, slots, 0, saved=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="slots must be on"):
            op.run(src, slots.cpu(), 0)
        with pytest.raises(ValueError, match="host_kv must be pinned"):
            fs.FlashD2HScatter().plan(torch.zeros((2, 4, 2, 4, 8)), DEVICE)
