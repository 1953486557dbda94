"""Per-sample state: duplicate-index rule, checkpoint round trip, summary, DDP synchronisation (gloo)."""

from __future__ import annotations

import io
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.adversarial.state import SampleState


def test_fresh_state():
    s = SampleState(5, 0.03)
    assert torch.equal(s.eps, torch.full((5,), 0.03)) and torch.equal(s.dist, s.eps)
    assert s.tau is None and s.epoch == 0
    assert not s.found.any() and not s.correct.any() and not s.seen.any()
    assert torch.isnan(s.clean_loss).all() and torch.isnan(s.adv_loss).all()


def test_duplicate_indices_follow_the_documented_rule():
    """Three patches of volume 2, two of volume 4, one of volume 0 in one batch."""
    s = SampleState(6, 0.5)
    index = torch.tensor([2, 4, 2, 0, 2, 4])
    s.record(index,
             correct=torch.tensor([True, True, False, True, True, True]),
             found=torch.tensor([False, False, True, False, False, False]),
             clean_loss=torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
             adv_loss=torch.tensor([2.0, 4.0, 6.0, 8.0, 10.0, 12.0]))
    assert s.correct.tolist() == [True, False, False, False, True, False]      # volume 2: one patch wrong
    assert s.found.tolist() == [False, False, True, False, False, False]       # volume 2: one patch crossed
    assert s.seen.tolist() == [True, False, True, False, True, False]
    assert torch.allclose(s.clean_loss[[0, 2, 4]], torch.tensor([4.0, 3.0, 4.0]))   # means over patches
    assert torch.allclose(s.adv_loss[[0, 2, 4]], torch.tensor([8.0, 6.0, 8.0]))
    assert torch.isnan(s.clean_loss[[1, 3, 5]]).all()
    # distance: mean over the crossed patches only
    hit, d = s.mean_by_index(index, torch.tensor([9.0, 1.0, 3.0, 9.0, 5.0, 2.0]),
                             torch.tensor([False, True, True, False, True, False]))
    assert hit.tolist() == [2, 4] and torch.allclose(d, torch.tensor([4.0, 1.0]))
    # a later batch overwrites only its own indices
    s.record(torch.tensor([1]), correct=torch.tensor([True]), clean_loss=torch.tensor([7.0]))
    assert s.correct.tolist() == [True, True, False, False, True, False]
    assert s.clean_loss[1] == 7.0 and s.clean_loss[2] == 3.0


def test_state_dict_round_trip_is_bit_for_bit():
    torch.manual_seed(0)
    s = SampleState(7, 0.1)
    s.eps = torch.rand(7)
    s.dist = torch.rand(7)
    s.record(torch.tensor([0, 3, 3]), correct=torch.tensor([True, True, False]),
             found=torch.tensor([True, False, False]), clean_loss=torch.rand(3), adv_loss=torch.rand(3))
    s.tau, s.epoch = 0.123456789, 4
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    t = SampleState(7, 0.5)
    t.load_state_dict(loaded)
    for key in ("eps", "dist", "found", "correct", "seen", "touched", "clean_loss", "adv_loss"):
        a, b = getattr(s, key), getattr(t, key)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a.view(
            torch.int32), b.view(torch.uint8) if b.dtype == torch.bool else b.view(torch.int32)), key
    assert t.tau == s.tau and t.epoch == 4
    u = SampleState(7, 0.5)
    u.load_state_dict(SampleState(7, 0.5).state_dict())
    assert u.tau is None
    with pytest.raises(ValueError, match="7 samples"):
        SampleState(8, 0.5).load_state_dict(s.state_dict())


def test_summary_and_reset():
    s = SampleState(11, 0.0)
    s.eps = torch.arange(11, dtype=torch.float32) / 10
    s.record(torch.tensor([0, 1, 2, 3]), correct=torch.tensor([True, True, False, True]),
             found=torch.tensor([True, False, False, False]))
    out = s.summary()
    assert out["eps_mean"] == pytest.approx(0.5) and out["eps_p50"] == pytest.approx(0.5)
    assert out["eps_p10"] == pytest.approx(0.1) and out["eps_p90"] == pytest.approx(0.9)
    assert out["eps_max"] == pytest.approx(1.0) and out["eps_min"] == 0.0
    assert out["correct_frac"] == pytest.approx(0.75) and out["found_frac"] == pytest.approx(0.25)
    assert "tau" not in out
    s.tau = 0.5
    assert s.summary()["tau"] == 0.5
    s.reset_epoch()
    assert not s.seen.any() and not s.found.any() and torch.isnan(s.adv_loss).all()
    assert s.eps[10] == pytest.approx(1.0)                    # radii survive the epoch reset
    s.sync_()                                                 # no process group: a no-op


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        s = SampleState(6, 1.0)
        # rank 0 saw samples 0, 1, 2; rank 1 saw 2, 3 (sample 2 twice, as DistributedSampler pads)
        if rank == 0:
            s.record(torch.tensor([0, 1, 2]), correct=torch.tensor([True, False, True]),
                     found=torch.tensor([False, False, False]), clean_loss=torch.tensor([1.0, 2.0, 3.0]))
            hit, d = s.mean_by_index(torch.tensor([0, 2]), torch.tensor([0.5, 0.2]), torch.tensor([True, True]))
        else:
            s.record(torch.tensor([2, 3]), correct=torch.tensor([False, True]),
                     found=torch.tensor([True, True]), clean_loss=torch.tensor([5.0, 4.0]))
            hit, d = s.mean_by_index(torch.tensor([2, 3]), torch.tensor([0.6, 0.4]), torch.tensor([True, True]))
        s.dist[hit] = (s.dist[hit] + d) / 2
        s.sync_()
        queue.put((rank, {k: v.tolist() for k, v in s.state_dict().items() if torch.is_tensor(v)}))
    finally:
        dist.destroy_process_group()


def test_sync_makes_every_rank_see_the_same_values():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    a, b = results[0], results[1]
    assert a == b or all(a[k] == b[k] or _nan_equal(a[k], b[k]) for k in a)
    assert a["correct"] == [True, False, False, True, False, False]      # sample 2: wrong on rank 1
    assert a["found"] == [False, False, True, True, False, False]
    assert a["seen"] == [True, True, True, True, False, False]
    assert a["clean_loss"][:4] == [1.0, 2.0, 4.0, 4.0] and all(math.isnan(v) for v in a["clean_loss"][4:])
    assert a["dist"] == pytest.approx([0.75, 1.0, (0.6 + 0.8) / 2, 0.7, 1.0, 1.0])
    assert not any(a["touched"])


def _nan_equal(x, y):
    return all((u == v) or (math.isnan(u) and math.isnan(v)) for u, v in zip(x, y))
