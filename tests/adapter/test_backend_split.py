"""`split_decodes`: which leading rows of a batch the sparse decode path serves (the rest attend densely)."""

from types import SimpleNamespace

import pytest
import torch

from sparseserve_vllm.adapter.backend import split_decodes


def batch(qlens, is_prefilling=None, num_reqs=None, num_tokens=None):
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    return SimpleNamespace(query_start_loc_cpu=qsl, num_reqs=num_reqs or len(qlens),
                           num_actual_tokens=num_tokens if num_tokens is not None else int(sum(qlens)),
                           is_prefilling=None if is_prefilling is None else torch.tensor(is_prefilling))


@pytest.mark.parametrize("cm, want", [
    (batch([1, 1, 1]), (3, 3)),                                                  # pure decode
    (batch([1, 1, 1, 0, 0], [False, False, False], num_tokens=3), (5, 3)),        # full-graph padding (MRV2)
    (batch([1, 1, 50, 20]), (2, 2)),                                             # decodes, then prefill chunks
    (batch([1, 1, 1], [False, True, False]), (1, 1)),                            # a one-token last prompt chunk
    (batch([40, 1]), (0, 0)),                                                    # no decode first
])
def test_split_decodes(cm, want):
    assert split_decodes(cm) == want
