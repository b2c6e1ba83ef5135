"""`LaggedRead`: a snapshot is read one `swap` later, with its tag; `take` reads the pending one at once; the host
buffer grows when a snapshot needs it; on CUDA a `swap` never waits for GPU work queued after the previous one."""

from __future__ import annotations

import pytest
import torch

from sparseserve_vllm.core.lagged_read import LaggedRead
from tests.host_sync import allow_lagged_reads, forbid_host_sync


def test_values_come_back_one_swap_later_with_their_tag():
    lagged = LaggedRead("cpu", 3)
    counts = torch.tensor([1, 2, 3])
    assert lagged.swap(counts, tag="step 0") is None  # nothing snapshotted before
    counts.add_(10)  # the device tensor changes after the swap: the snapshot keeps the values it had
    assert lagged.swap(counts, tag="step 1") == ("step 0", [1, 2, 3])
    assert lagged.swap(counts[:1], tag="step 2") == ("step 1", [11, 12, 13])
    assert lagged.take() == ("step 2", [11])  # a synchronous reader takes the pending snapshot ...
    assert lagged.take() is None  # ... once
    assert lagged.swap(torch.arange(7), tag=3) is None  # more values than the buffer held: it grows
    assert lagged.take() == (3, list(range(7)))


def test_swap_reads_nothing_but_its_snapshot():
    lagged = LaggedRead("cpu", 2)
    lagged.swap(torch.tensor([4, 5]))
    with pytest.MonkeyPatch.context() as mp:
        forbid_host_sync(mp)
        allow_lagged_reads(mp)
        assert lagged.swap(torch.tensor([6, 7])) == (None, [4, 5])
        with pytest.raises(AssertionError, match="sync-free path"):  # any other read is still caught
            torch.tensor([6, 7]).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_swap_does_not_wait_for_work_queued_after_the_previous_swap():
    lagged = LaggedRead("cuda", 4)
    counts = torch.ones(4, dtype=torch.int64, device="cuda")
    lagged.swap(counts, tag=0)
    counts.add_(1)
    torch.cuda._sleep(1_000_000_000)  # about half a second of GPU work queued after the snapshot
    busy = torch.cuda.Event()
    busy.record()
    torch.cuda.set_sync_debug_mode("error")
    try:
        previous = lagged.swap(counts, tag=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not busy.query(), "swap waited for the GPU work queued after the previous snapshot"
    assert previous == (0, [1, 1, 1, 1])
    assert lagged.take() == (1, [2, 2, 2, 2])  # waits for the copy, queued after the sleep
