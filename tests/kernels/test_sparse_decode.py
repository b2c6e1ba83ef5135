"""sparse_decode_attention (Triton kernel, split-K merge, torch path) against a float64 loop reference."""

import pytest
import torch

from sparseserve_vllm.kernels import choose_num_splits, sparse_decode_attention

from .conftest import BACKENDS, DEVICE, ref_attention_pages

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _inputs(bsz, hq, hkv, d, page, k, n_slots, dtype, gen, pad_last_dim=0):
    """Random q, a (possibly strided) flat page view, distinct slots per row and mixed page lengths."""
    q = torch.randn((bsz, hq, d), generator=gen).to(DEVICE, dtype)
    store = torch.randn((n_slots, page, 2 * d + pad_last_dim), generator=gen).to(DEVICE, dtype)
    kv_pages = store[..., :2 * d] if pad_last_dim else store
    slots = torch.stack([torch.randperm(n_slots, generator=gen)[:k] for _ in range(bsz * hkv)])
    lens = torch.full((bsz * hkv, k), page)
    lens[:, -1] = torch.randint(1, page + 1, (bsz * hkv,), generator=gen)   # partial last page
    return (q, kv_pages, slots.view(bsz, hkv, k).to(torch.int32).to(DEVICE),
            lens.view(bsz, hkv, k).to(torch.int32).to(DEVICE))


CASES = [
    # (B, Hq, Hkv, D, page_size, K, dtype, num_splits)
    (2, 4, 4, 64, 16, 5, torch.float32, 1),      # G = 1
    (2, 8, 4, 128, 32, 4, torch.float32, 3),     # G = 2, split-K with an uneven split
    (1, 16, 4, 64, 64, 3, torch.bfloat16, 1),    # G = 4
    (2, 16, 2, 128, 16, 9, torch.bfloat16, 2),   # G = 8, 4 pages per tile
    (1, 8, 1, 64, 32, 6, torch.float16, 4),      # G = 8, MQA
    (2, 8, 2, 128, 64, 4, torch.bfloat16, 8),    # more splits than pages per tile
    (1, 6, 3, 96, 16, 5, torch.float32, 2),      # Hkv and D not powers of two
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"G{c[1] // c[2]}-D{c[3]}-p{c[4]}-s{c[7]}" for c in CASES])
def test_attention_matches_float64_reference(case, backend):
    bsz, hq, hkv, d, page, k, dtype, splits = case
    gen = torch.Generator().manual_seed(200 + CASES.index(case))
    q, kv_pages, slots, lens = _inputs(bsz, hq, hkv, d, page, k, 4 * k * hkv, dtype, gen, pad_last_dim=8)
    out = torch.full_like(q, float("nan"))
    sparse_decode_attention(q, kv_pages, slots, lens, scale=d ** -0.5, out=out, num_splits=splits,
                            backend=backend)
    ref = ref_attention_pages(q, kv_pages, slots, lens, d ** -0.5)
    torch.testing.assert_close(out.double().cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [1, 3])
def test_padding_entries_and_empty_rows(backend, splits):
    """Zero-length entries anywhere are ignored; a (request, KV head) with no valid token outputs zeros."""
    gen = torch.Generator().manual_seed(9 + splits)
    bsz, hq, hkv, d, page, k = 3, 8, 2, 64, 16, 7
    q, kv_pages, slots, lens = _inputs(bsz, hq, hkv, d, page, k, 60, torch.float32, gen)
    lens[0, 0, 2] = 0                  # padding in the middle
    lens[0, 1, 4:] = 0                 # -1-style padding at the end
    slots[0, 1, 4:] = 0
    lens[1, 1, :] = 0                  # nothing to attend to
    lens[2, :, 0] = 1                  # a single token in a page
    out = torch.full_like(q, float("nan"))
    sparse_decode_attention(q, kv_pages, slots, lens, scale=0.3, out=out, num_splits=splits, backend=backend)
    ref = ref_attention_pages(q, kv_pages, slots, lens, 0.3)
    assert torch.equal(out[1, 4:].cpu(), torch.zeros_like(out[1, 4:].cpu()))
    torch.testing.assert_close(out.double().cpu(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_q_and_out(backend):
    gen = torch.Generator().manual_seed(11)
    bsz, hq, hkv, d, page, k = 2, 8, 2, 64, 32, 3
    q, kv_pages, slots, lens = _inputs(bsz, hq, hkv, d, page, k, 20, torch.float32, gen)
    q_big = torch.randn((bsz, hq, 3 * d), generator=gen).to(DEVICE)
    q_big[..., d:2 * d] = q
    out_big = torch.full((bsz, hq, 2 * d), float("nan"), device=DEVICE)
    sparse_decode_attention(q_big[..., d:2 * d], kv_pages, slots, lens, scale=0.125, out=out_big[..., :d],
                            backend=backend)
    ref = ref_attention_pages(q, kv_pages, slots, lens, 0.125)
    torch.testing.assert_close(out_big[..., :d].double().cpu(), ref, **TOL[torch.float32])
    assert torch.isnan(out_big[..., d:]).all()


def test_choose_num_splits():
    assert choose_num_splits(64, 8, 64, 132) == 1           # 512 programs already fill the GPU
    assert choose_num_splits(1, 8, 64, 132) == 8            # capped so that each split keeps >= 8 pages
    assert choose_num_splits(4, 8, 256, 132) == 9
    assert choose_num_splits(1, 1, 4, 132) == 1


def test_bad_arguments():
    q = torch.zeros((1, 4, 64), device=DEVICE)
    kv = torch.zeros((4, 16, 128), device=DEVICE)
    slots = torch.zeros((1, 2, 3), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="kv_pages"):
        sparse_decode_attention(q, kv.half(), slots, slots, scale=1.0)
    with pytest.raises(ValueError, match="page_lens"):
        sparse_decode_attention(q, kv, slots, slots.long(), scale=1.0)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_decode_attention(q, kv, slots, slots, scale=1.0, num_splits=0, backend="triton")
