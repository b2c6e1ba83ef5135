"""`LaggedRead`: a snapshot is read one `swap` later, with its tag; one the GPU has not reached comes back later, up to
`depth` in flight; `take` reads the pending ones at once; the host buffer grows when a snapshot needs it; on CUDA a
`swap` never waits for GPU work queued after the previous one."""

from __future__ import annotations

import pytest
import torch

from sparseserve_vllm.core.lagged_read import LaggedRead
from tests.host_sync import allow_lagged_reads, forbid_host_sync


def test_values_come_back_one_swap_later_with_their_tag():
    lagged = LaggedRead("cpu", 3)
    counts = torch.tensor([1, 2, 3])
    assert lagged.swap(counts, tag="step 0") == []  # nothing snapshotted before
    counts.add_(10)  # the device tensor changes after the swap: the snapshot keeps the values it had
    assert lagged.swap(counts, tag="step 1") == [("step 0", [1, 2, 3])]
    assert lagged.swap(counts[:1], tag="step 2") == [("step 1", [11, 12, 13])]
    assert lagged.take() == [("step 2", [11])]  # a synchronous reader takes the pending snapshot ...
    assert lagged.take() == []  # ... once
    assert lagged.swap(torch.arange(7), tag=3) == []  # more values than the buffer held: it grows
    assert lagged.take() == [(3, list(range(7)))]


class SlowEvent:
    """Stands in for a CUDA event whose copy the GPU has not reached until `done` is set (or it is waited for)."""

    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def test_a_snapshot_the_gpu_has_not_reached_comes_back_later_instead_of_waiting(monkeypatch):
    made, recorded = [], []  # events made; the event of each snapshot, in order (a read snapshot's is used again)

    def record(self, event):
        event.done = False
        recorded.append(event)

    monkeypatch.setattr(LaggedRead, "_new_event", lambda self: made.append(SlowEvent()) or made[-1])
    monkeypatch.setattr(LaggedRead, "_record", record)
    lagged = LaggedRead("cpu", 2, depth=3)
    assert lagged.swap(torch.tensor([1, 1]), tag=0) == []
    assert lagged.swap(torch.tensor([2, 2]), tag=1) == []  # snapshot 0 not reached: not waited for
    recorded[0].done = True
    assert lagged.swap(torch.tensor([3, 3]), tag=2) == [(0, [1, 1])]  # 1 is not done: it stops there
    recorded[1].done = recorded[2].done = True
    assert lagged.swap(torch.tensor([4, 4]), tag=3) == [(1, [2, 2]), (2, [3, 3])]  # oldest first
    assert len(made) == 2  # read snapshots' buffers and events are used again
    assert lagged.swap(torch.tensor([5, 5]), tag=4) == []
    assert lagged.swap(torch.tensor([6, 6]), tag=5) == []
    # depth 3 in flight (3, 4, 5), none reached: the next swap waits for the oldest only
    assert lagged.swap(torch.tensor([7, 7]), tag=6) == [(3, [4, 4])]
    assert lagged.take() == [(4, [5, 5]), (5, [6, 6]), (6, [7, 7])]


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        LaggedRead("cpu", 2, depth=0)


def test_swap_reads_nothing_but_its_snapshot():
    lagged = LaggedRead("cpu", 2)
    lagged.swap(torch.tensor([4, 5]))
    with pytest.MonkeyPatch.context() as mp:
        forbid_host_sync(mp)
        allow_lagged_reads(mp)
        assert lagged.swap(torch.tensor([6, 7])) == [(None, [4, 5])]
        with pytest.raises(AssertionError, match="sync-free path"):  # any other read is still caught
            torch.tensor([6, 7]).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_swap_does_not_wait_for_work_queued_after_the_previous_swap():
    lagged = LaggedRead("cuda", 4)
    counts = torch.ones(4, dtype=torch.int64, device="cuda")
    lagged.swap(counts, tag=0)
    torch.cuda.synchronize()  # the snapshot's copy is done
    counts.add_(1)
    torch.cuda._sleep(1_000_000_000)  # about half a second of GPU work queued after the snapshot
    busy = torch.cuda.Event()
    busy.record()
    torch.cuda.set_sync_debug_mode("error")
    try:
        previous = lagged.swap(counts, tag=1)
        behind = lagged.swap(counts, tag=2)  # the GPU has not reached snapshot 1 (queued after the sleep)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not busy.query(), "swap waited for the GPU work queued after the previous snapshot"
    assert previous == [(0, [1, 1, 1, 1])] and behind == []
    assert lagged.take() == [(1, [2, 2, 2, 2]), (2, [2, 2, 2, 2])]  # waits for the copies, queued after the sleep
