"""GQA-aware top-k page selection: one selection of logical pages per (request, KV head).

``select_pages(scores, seq_lens, *, page_size, num_select, sink_pages, recent_pages, out=None, block_table=None,
ppb=None, slots_out=None, lens_out=None, counters=None, backend="auto")``; reference/CPU path
``select_pages_torch`` (same arguments, no ``backend``).

Inputs: ``scores`` ``[B, Hkv, P]`` float32 (contiguous last dim; NaN is treated as ``-inf``), ``seq_lens``
``[>= B]`` int32/int64. Output ``out`` ``[B, Hkv, num_select]`` int32: logical page indices in ascending order,
padded at the end with ``-1``. With ``n = ceil(seq_len / page_size)`` and ``nf = seq_len // page_size``:
  * ``n <= num_select``: pages ``0 .. n-1``;
  * otherwise the forced pages ``[0, min(sink_pages, nf))``, ``[max(nf - recent_pages, 0), nf)`` and ``n-1`` when
    ``seq_len % page_size != 0`` (the partial page), plus the ``num_select - |forced|`` highest-scoring other full
    pages (ties: the lower page index wins). Exactly ``num_select`` pages are returned.
  * ``seq_len == 0``: all ``-1``.
``ValueError`` if ``sink_pages + recent_pages + 1 > num_select``. The caller guarantees ``n <= P``
(``seq_len <= P * page_size``); otherwise the selection is unspecified but memory accesses stay in bounds.

Optional fused outputs (so that the whole decode step needs no torch temporaries on GPU):
  * ``block_table`` ``[>= B, max_blocks]`` + ``ppb``: also write ``slots_out``/``lens_out`` (int32, same shape as
    ``out``), exactly ``pages_to_slots(out, block_table, seq_lens, ...)``: flat slot id and valid token count of
    each selected page, ``0``/``0`` for padding.
  * ``counters`` int64 ``[3]``: incremented by (pages scored = ``Hkv * nf`` summed over requests, pages selected,
    tokens in the selected pages) without host synchronisation.

Triton kernel: one program per (request, KV head) that walks its request's own ``n`` pages in chunks (``P <=
16384``; the cost follows the context, not ``P``, so a plan sized for the longest context costs nothing extra for
short ones). The threshold score of rank ``num_select - |forced|`` is found by a ``RADIX``-way search on an
order-preserving int32 encoding of the fp32 scores (``32 / log2(RADIX)`` rounds, each counting the pages at or
above ``RADIX`` evenly spaced keys in one pass: 8 serial reductions instead of a bisection's 32, which bound the
kernel's latency at small batch); ties at the threshold are resolved by a running prefix sum
(lowest index first); the selected mask is compacted with a running prefix sum, so the output is ascending by
construction (no sort).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .pages import pages_to_slots, resolve_backend

MAX_SELECT_PAGES = 16384
# Launch configuration: pages per chunk, keys counted per search round (2, 4 or 16: 32, 16 or 8 rounds) when the
# grid fills the GPU and when it is at most one program per SM (latency-bound: fewer, wider rounds), and warps.
# Tuned by benchmarks/bench_sparse_decode.py --tune (H200, 2026-11-30: 1 x 16K, 8 programs: radix 16 8.4 us, 4 9.3,
# 2 13.7; 64 x 32K, 512 programs: radix 4 26.3 us, 2 33.7, 16 35.0; 4 warps best for each).
SELECT_LAUNCH = {"chunk": 1024, "radix": 4, "radix_one_wave": 16, "num_warps": 4}
_RADIX_BITS = {2: 1, 4: 2, 16: 4}


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the interpreter on the CPU: an H200's 132)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _validate(scores, seq_lens, page_size, num_select, sink_pages, recent_pages, out, block_table, ppb,
              slots_out, lens_out, counters):
    for name, v, lo in (("page_size", page_size, 1), ("num_select", num_select, 1),
                        ("sink_pages", sink_pages, 0), ("recent_pages", recent_pages, 0)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if sink_pages + recent_pages + 1 > num_select:
        raise ValueError(f"sink_pages + recent_pages + 1 must be <= num_select, got {sink_pages} + "
                         f"{recent_pages} + 1 > {num_select}")
    if scores.dim() != 3 or scores.dtype != torch.float32 or scores.stride(-1) != 1:
        raise ValueError(f"scores must be float32 [B, Hkv, P] with a contiguous last dim, got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    bsz, hkv, _ = scores.shape
    if (seq_lens.dim() != 1 or seq_lens.shape[0] < bsz or seq_lens.stride(0) != 1
            or seq_lens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"seq_lens must be a contiguous int32/int64 tensor [>= B={bsz}], got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    shape = (bsz, hkv, num_select)
    if out is None:
        out = torch.empty(shape, dtype=torch.int32, device=scores.device)
    if (block_table is None) != (ppb is None):
        raise ValueError("block_table and ppb must be given together")
    if block_table is not None:
        if not isinstance(ppb, int) or ppb <= 0:
            raise ValueError(f"ppb must be a positive int, got {ppb!r}")
        if (block_table.dim() != 2 or block_table.shape[0] < bsz or block_table.stride(1) != 1
                or block_table.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"block_table must be int32/int64 [>= B={bsz}, max_blocks] with a contiguous last "
                             f"dim, got {block_table.dtype} {tuple(block_table.shape)}")
        if slots_out is None:
            slots_out = torch.empty(shape, dtype=torch.int32, device=scores.device)
        if lens_out is None:
            lens_out = torch.empty(shape, dtype=torch.int32, device=scores.device)
    elif slots_out is not None or lens_out is not None:
        raise ValueError("slots_out/lens_out need block_table and ppb")
    for name, t in (("out", out), ("slots_out", slots_out), ("lens_out", lens_out)):
        if t is not None and (t.shape != shape or t.dtype != torch.int32 or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous int32 tensor of shape {shape}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    if counters is not None and (counters.shape != (3,) or counters.dtype != torch.int64):
        raise ValueError(f"counters must be int64 of shape (3,), got {counters.dtype} {tuple(counters.shape)}")
    return out, slots_out, lens_out


def select_pages_torch(scores, seq_lens, *, page_size, num_select, sink_pages, recent_pages, out=None,
                       block_table=None, ppb=None, slots_out=None, lens_out=None, counters=None):
    """Pure-torch page selection (CPU path and reference semantics); see module docstring."""
    out, slots_out, lens_out = _validate(scores, seq_lens, page_size, num_select, sink_pages, recent_pages, out,
                                         block_table, ppb, slots_out, lens_out, counters)
    bsz, hkv, n_pages = scores.shape
    dev = scores.device
    idx = torch.arange(n_pages, device=dev).view(1, 1, -1)
    sl = seq_lens[:bsz].long().view(-1, 1, 1)
    n = (sl + page_size - 1) // page_size
    nf = sl // page_size
    forced = (((idx < sink_pages) & (idx < nf)) | ((idx >= nf - recent_pages) & (idx < nf))
              | ((idx == n - 1) & (sl % page_size != 0)))
    cand = ((idx < nf) & ~forced).expand(bsz, hkv, n_pages)
    need = num_select - forced.sum(-1, keepdim=True)                               # [B, 1, 1]
    s = torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices            # ties: lower index first
    cand_sorted = cand.gather(-1, order)
    rank = torch.cumsum(cand_sorted.long(), -1) - 1
    chosen = torch.zeros_like(cand).scatter(-1, order, cand_sorted & (rank < need))
    sel = torch.where(n <= num_select, idx < n, forced | chosen)
    key = torch.where(sel, idx, torch.full_like(idx, n_pages)).expand(bsz, hkv, n_pages)
    ordered = torch.sort(key, dim=-1).values[..., :num_select]
    out.fill_(-1)
    k = ordered.shape[-1]
    out[..., :k] = torch.where(ordered == n_pages, torch.full_like(ordered, -1), ordered).to(torch.int32)
    if block_table is not None:
        pages_to_slots(out, block_table, seq_lens, page_size=page_size, ppb=ppb, num_kv_heads=hkv,
                       out=(slots_out, lens_out))
    if counters is not None:
        valid = out >= 0
        plen = (sl - out.long() * page_size).clamp(0, page_size)
        counters[0] += nf.sum() * hkv
        counters[1] += valid.sum()
        counters[2] += torch.where(valid, plen, torch.zeros_like(plen)).sum()
    return out


@triton.jit
def _score_keys(row_ptr, idx, mask):
    """int32 keys monotone in the fp32 scores at `row_ptr + idx` (NaN and masked-out entries count as -inf)."""
    s = tl.load(row_ptr + idx, mask=mask, other=float("-inf"))
    s = tl.where(s != s, float("-inf"), s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _select_pages_kernel(
    scores_ptr, seq_ptr, out_ptr, bt_ptr, slots_ptr, lens_ptr, cnt_ptr,
    stride_sb, stride_sh, stride_btb,
    n_pages, num_kv_heads, page_size, ppb, num_select, sink_pages, recent_pages,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, RADIX: tl.constexpr, RADIX_BITS: tl.constexpr,
    WRITE_SLOTS: tl.constexpr, COUNT: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    h = pid % num_kv_heads
    sl = tl.load(seq_ptr + b).to(tl.int32)
    n = tl.minimum((sl + page_size - 1) // page_size, n_pages)
    nf = tl.minimum(sl // page_size, n)
    partial = (sl % page_size != 0) & (n > nf)
    row_s = scores_ptr + b * stride_sb + h * stride_sh
    ar = tl.arange(0, CHUNK)
    # |forced| = sinks + recent (minus their overlap) + the partial page.
    n_sink = tl.minimum(sink_pages, nf)
    recent_lo = tl.maximum(nf - recent_pages, 0)
    need = num_select - (n_sink + (nf - recent_lo) - tl.maximum(n_sink - recent_lo, 0) + partial.to(tl.int32))
    # Largest threshold t with |{cand: key >= t}| >= need: a RADIX-way search over the int32 key range [lo, lo +
    # width) with the invariant count(>= lo) >= need > count(>= lo + width). Each round counts, in one pass over the
    # request's own pages (CHUNK at a time, so the cost follows the context, not the planned maximum), the
    # candidates at or above each of the RADIX keys lo + j * width / RADIX; the number k of those counts that reach
    # `need` (k >= 1, as j = 0 is lo) narrows the range to [lo + (k - 1) * step, lo + k * step).
    lo = tl.zeros((), dtype=tl.int64) - 2147483648
    jr = tl.arange(0, RADIX).to(tl.int64)
    if n > num_select:
        for r in range(32 // RADIX_BITS):
            step_bits = 32 - RADIX_BITS * (r + 1)
            marks = (lo + (jr << step_bits)).to(tl.int32)   # < 2**31: the top of the range is never a mark
            cnt = tl.zeros([RADIX], dtype=tl.int32)
            for c0 in range(0, nf, CHUNK):
                idx = c0 + ar
                cand = (idx < nf) & (idx >= n_sink) & (idx < recent_lo)
                key = _score_keys(row_s, idx, cand)
                cnt += tl.sum((cand[:, None] & (key[:, None] >= marks[None, :])).to(tl.int32), axis=0)
            k = tl.sum((cnt >= need).to(tl.int64), axis=0)
            lo = lo + ((k - 1) << step_bits)
    lo = lo.to(tl.int32)
    # Pass over the pages: select, compact in ascending order, write slots and counters.
    row = pid.to(tl.int64) * num_select
    n_above = tl.zeros((), dtype=tl.int32)
    if n > num_select:
        for c0 in range(0, nf, CHUNK):
            idx = c0 + ar
            cand = (idx < nf) & (idx >= n_sink) & (idx < recent_lo)
            key = _score_keys(row_s, idx, cand)
            n_above += tl.sum((cand & (key > lo)).to(tl.int32), axis=0)
    ties_left = need - n_above
    count = tl.zeros((), dtype=tl.int32)
    tokens = tl.zeros((), dtype=tl.int32)
    for c0 in range(0, n, CHUNK):
        idx = c0 + ar
        in_row = idx < n
        forced = (idx < n_sink) | ((idx >= recent_lo) & (idx < nf)) | ((idx == n - 1) & partial)
        cand = (idx < nf) & ~forced
        key = _score_keys(row_s, idx, cand)
        tie = cand & (key == lo)
        tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
        take = tie & (tie_rank <= ties_left)
        ties_left -= tl.sum(take.to(tl.int32), axis=0)
        sel = tl.where(n <= num_select, in_row, forced | (cand & (key > lo)) | take) & in_row
        pos = count + tl.cumsum(sel.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + row + pos, idx, mask=sel)
        plen = tl.minimum(tl.maximum(sl - idx * page_size, 0), page_size)
        if WRITE_SLOTS:
            blk = tl.load(bt_ptr + b * stride_btb + idx // ppb, mask=sel, other=0).to(tl.int64)
            slot = (blk * num_kv_heads + h) * ppb + idx % ppb
            tl.store(slots_ptr + row + pos, slot.to(tl.int32), mask=sel)
            tl.store(lens_ptr + row + pos, plen, mask=sel)
        count += tl.sum(sel.to(tl.int32), axis=0)
        tokens += tl.sum(tl.where(sel, plen, 0), axis=0)
    j = tl.arange(0, BLOCK_K)
    pad = (j >= count) & (j < num_select)
    tl.store(out_ptr + row + j, tl.full([BLOCK_K], -1, tl.int32), mask=pad)
    if WRITE_SLOTS:
        zeros = tl.zeros([BLOCK_K], dtype=tl.int32)
        tl.store(slots_ptr + row + j, zeros, mask=pad)
        tl.store(lens_ptr + row + j, zeros, mask=pad)
    if COUNT:
        tl.atomic_add(cnt_ptr + 0, nf.to(tl.int64))
        tl.atomic_add(cnt_ptr + 1, count.to(tl.int64))
        tl.atomic_add(cnt_ptr + 2, tokens.to(tl.int64))


def select_pages(scores, seq_lens, *, page_size, num_select, sink_pages, recent_pages, out=None,
                 block_table=None, ppb=None, slots_out=None, lens_out=None, counters=None, backend="auto"):
    """Selected logical pages ``[B, Hkv, num_select]`` int32 (see module docstring)."""
    if resolve_backend(backend, scores) == "torch":
        return select_pages_torch(scores, seq_lens, page_size=page_size, num_select=num_select,
                                  sink_pages=sink_pages, recent_pages=recent_pages, out=out,
                                  block_table=block_table, ppb=ppb, slots_out=slots_out, lens_out=lens_out,
                                  counters=counters)
    out, slots_out, lens_out = _validate(scores, seq_lens, page_size, num_select, sink_pages, recent_pages, out,
                                         block_table, ppb, slots_out, lens_out, counters)
    bsz, hkv, n_pages = scores.shape
    if n_pages > MAX_SELECT_PAGES:
        raise ValueError(f"scores.shape[-1] (pages per request) must be <= {MAX_SELECT_PAGES}, got {n_pages}")
    if bsz == 0:
        return out
    chunk = min(triton.next_power_of_2(max(n_pages, 16)), SELECT_LAUNCH["chunk"])
    one_wave = bsz * hkv <= _num_sms(scores.device)
    radix = SELECT_LAUNCH["radix_one_wave" if one_wave else "radix"]
    if radix not in _RADIX_BITS:
        raise ValueError(f"SELECT_LAUNCH radix values must be one of {sorted(_RADIX_BITS)}, got {radix!r}")
    write_slots = block_table is not None
    _select_pages_kernel[(bsz * hkv,)](
        scores, seq_lens, out,
        block_table if write_slots else out, slots_out if write_slots else out,
        lens_out if write_slots else out, counters if counters is not None else out,
        scores.stride(0), scores.stride(1), block_table.stride(0) if write_slots else 0,
        n_pages, hkv, page_size, ppb if write_slots else 1, num_select, sink_pages, recent_pages,
        CHUNK=chunk, BLOCK_K=triton.next_power_of_2(num_select), RADIX=radix, RADIX_BITS=_RADIX_BITS[radix],
        WRITE_SLOTS=write_slots,
        COUNT=counters is not None, num_warps=SELECT_LAUNCH["num_warps"],
    )
    return out
