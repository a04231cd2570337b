"""``deepep_switch.launch``: a rank body that tears the default process group down itself still reports its
result (rtp-llm's ``destroy_distributed_environment()`` does exactly that at the end of its test workers)."""

from __future__ import annotations

import queue

import pytest
import torch
import torch.distributed as dist

from deepep_switch import launch


def _tears_down(rank: int, world: int) -> tuple[int, int, bool]:
    seen = (dist.get_rank(), dist.get_world_size(), dist.is_initialized())
    dist.destroy_process_group()
    return seen


def _keeps(rank: int, world: int) -> bool:
    return dist.is_initialized()


@pytest.mark.parametrize("fn,expected", [(_tears_down, (0, 1, True)), (_keeps, True)])
def test_child_reports_whether_or_not_the_body_destroyed_the_group(monkeypatch, fn, expected):
    # _child is the spawned side; run it in this process with one rank (no second process to start).
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(key, "0")  # _child overwrites them; monkeypatch restores them afterwards
    threads = torch.get_num_threads()
    results: "queue.Queue" = queue.Queue()
    try:
        launch._child(fn, 0, 1, launch.free_port(), "gloo", (), {}, 30.0, results)
    finally:
        torch.set_num_threads(threads)
    rank, ok, value = results.get_nowait()
    assert ok, value
    assert rank == 0 and launch.pickle.loads(value) == expected
    assert results.empty()  # no second (failure) report from the teardown
    assert not dist.is_initialized()
