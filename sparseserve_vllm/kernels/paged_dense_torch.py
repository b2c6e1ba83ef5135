"""Dense paged attention and the KV-cache write, in plain torch: the CPU path for prefill and dense layers.

Layout (see docs/helper-brief.md): a layer's cache is `kv[num_blocks, Hkv, block_size, 2*D]`, K = `[..., :D]`,
V = `[..., D:]`. Slot `s` is token `s % block_size` of block `s // block_size`; slot -1 is padding.

- `write_kv(kv, key, value, slot_mapping)`: stores `key/value[t]` ([T, Hkv, D]) at `slot_mapping[t]` (skipping -1).
- `causal_attention(q, k, v, scale)`: query rows `q [qlen, Hq, D]` are the last `qlen` positions of the context
  `k, v [Hkv, L, D]` and attend causally to it (GQA as below); returns `[qlen, Hq, D]` in q's dtype.
- `paged_causal_attention(q, kv, block_table, query_start_loc, seq_lens, scale, out)`: for each request r, its
  query rows `q[qsl[r]:qsl[r+1]]` are the LAST `qlen` positions of its `seq_lens[r]`-token context and attend
  causally to the context (GQA: query head i reads KV head i // (Hq // Hkv)). Softmax in float32.
  `query_start_loc` and `seq_lens` are host (CPU) int tensors or lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    block_size, head_dim = kv.shape[2], key.shape[-1]
    n = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.long)
    key, value = key[:n], value[:n]
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    blocks, offsets = slots // block_size, slots % block_size
    kv[blocks, :, offsets, :head_dim] = key.to(kv.dtype)
    kv[blocks, :, offsets, head_dim:] = value.to(kv.dtype)


def gather_context(kv: torch.Tensor, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first `length` tokens of a request: two [Hkv, length, D] tensors."""
    head_dim = kv.shape[-1] // 2
    blocks = kv[block_ids.to(torch.long)]  # [nb, Hkv, bs, 2D]
    ctx = blocks.permute(1, 0, 2, 3).reshape(kv.shape[1], -1, 2 * head_dim)[:, :length]
    return ctx[..., :head_dim], ctx[..., head_dim:]


def paged_causal_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc,
    seq_lens,
    scale: float,
    out: torch.Tensor,
) -> None:
    block_size = kv.shape[2]
    qsl = [int(x) for x in query_start_loc]
    lens = [int(x) for x in seq_lens]
    for r, length in enumerate(lens):
        start, end = qsl[r], qsl[r + 1]
        qlen = end - start
        if qlen == 0:
            continue
        nblocks = -(-length // block_size)
        k, v = gather_context(kv, block_table[r, :nblocks], length)
        out[start:end] = causal_attention(q[start:end], k, v, scale)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    qlen, length = q.shape[0], k.shape[1]
    qr = q.transpose(0, 1).float()  # [Hq, qlen, D]
    pos_q = torch.arange(length - qlen, length, device=q.device).unsqueeze(1)
    mask = torch.arange(length, device=q.device).unsqueeze(0) <= pos_q  # [qlen, length]
    o = F.scaled_dot_product_attention(qr, k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(0, 1).to(q.dtype)
