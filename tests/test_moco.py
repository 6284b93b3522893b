"""MoCo module: queue, momentum update, key shuffling (one process and two gloo processes), side effects."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastvpd import dist as fdist
from fastvpd.losses import margin_info_nce
from fastvpd.moco import MoCo
from fastvpd.models import SplitBatchNorm


def _tiny(queue_size: int = 10, bn_splits: int = 2, dim: int = 4) -> MoCo:
    torch.manual_seed(0)
    return MoCo(
        "resnet18", dim=dim, mlp_hidden=8, queue_size=queue_size, bn_splits=bn_splits, small_stem=True
    )


def test_init_buffers_and_key_encoder() -> None:
    m = _tiny(queue_size=12, dim=6)
    assert m.queue.shape == (12, 6) and torch.allclose(m.queue.norm(dim=1), torch.ones(12))
    assert m.queue_ptr.shape == () and m.queue_ptr.dtype == torch.long and m.queue_ptr.item() == 0
    assert "queue" in m.state_dict() and "queue_ptr" in m.state_dict() and "_arange" not in m.state_dict()
    assert not any(p.requires_grad for p in m.encoder_k.parameters())
    assert all(p.requires_grad for p in m.encoder_q.parameters())
    for pq, pk in zip(m.encoder_q.parameters(), m.encoder_k.parameters()):
        assert torch.equal(pq, pk) and pq.data_ptr() != pk.data_ptr()
    assert any(isinstance(x, SplitBatchNorm) for x in m.encoder_q.modules())
    assert m.encoders() is m.encoder_q.backbone


@pytest.mark.parametrize(("k", "n"), [(10, 3), (10, 10), (12, 4), (7, 1)])
def test_enqueue_wraps_around_like_a_python_slice_reference(k: int, n: int) -> None:
    m = _tiny(queue_size=k, dim=4)
    ref = m.queue.clone().tolist()
    ptr = 0
    for step in range(7):
        keys = torch.full((n, 4), float(step)) + torch.arange(n).view(n, 1) / 100
        for i in range(n):  # reference: one row at a time, pointer wraps modulo K
            ref[(ptr + i) % k] = keys[i].tolist()
        ptr = (ptr + n) % k
        m.enqueue_(keys)
        assert m.queue_ptr.item() == ptr
        assert torch.equal(m.queue, torch.tensor(ref))


def test_enqueue_rejects_more_keys_than_the_queue_and_casts_dtype() -> None:
    m = _tiny(queue_size=4)
    with pytest.raises(ValueError, match="queue_size"):
        m.enqueue_(torch.zeros(5, 4))
    m.enqueue_(torch.ones(2, 4, dtype=torch.bfloat16))
    assert m.queue.dtype == torch.float32 and torch.equal(m.queue[:2], torch.ones(2, 4))


def test_momentum_update_matches_loop_formula_and_leaves_buffers() -> None:
    m = _tiny()
    m.momentum = 0.9
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        for b in m.encoder_q.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    k_bufs = [b.clone() for b in m.encoder_k.buffers()]
    want = [pk * 0.9 + pq * (1 - 0.9) for pq, pk in zip(m.encoder_q.parameters(), m.encoder_k.parameters())]
    m.momentum_update_()
    for got, w in zip(m.encoder_k.parameters(), want):
        assert torch.allclose(got, w, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(m.encoder_k.buffers(), k_bufs))  # BN stats not copied


def test_key_shuffle_is_undone_exactly() -> None:
    m = _tiny(bn_splits=2)
    m.encoder_k.eval()  # per-sample forward: the shuffled key must equal the plain one
    x = torch.randn(6, 3, 8, 8)
    assert torch.allclose(m.key(x), F.normalize(m.encoder_k(x), dim=1), atol=1e-6)
    m.encoder_k.train()  # split-BN with a shuffle: keys are unit vectors, no gradient
    k = m.key(x)
    assert not k.requires_grad and torch.allclose(k.norm(dim=1), torch.ones(6), atol=1e-5)


def test_loss_forward_have_no_side_effects_and_enqueue_before_backward_is_refused() -> None:
    m = _tiny(queue_size=16)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    queue, ptr = m.queue.clone(), m.queue_ptr.clone()
    k_params = [p.clone() for p in m.encoder_k.parameters()]
    loss, logits, k = m(x1, x2)
    assert logits.shape == (4, 17) and k.shape == (4, 4)
    assert torch.equal(m.queue, queue) and torch.equal(m.queue_ptr, ptr)
    assert all(torch.equal(a, b) for a, b in zip(m.encoder_k.parameters(), k_params))
    q = m.query(x1)
    loss, _ = m.loss(q, k)
    ref, _ = margin_info_nce(q, k, queue, m.temperature, m.margin)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    m.enqueue_(k)  # the logits hold the queue itself (no clone): enqueue before backward must fail loudly
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    m2 = _tiny(queue_size=16)
    loss2, _ = m2.loss(m2.query(x1), m2.key(x2))
    loss2.backward()  # the step's order: backward first, then enqueue_
    m2.enqueue_(k)
    assert all(p.grad is not None for p in m2.encoder_q.parameters())
    assert all(p.grad is None for p in m2.encoder_k.parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fdist.init("cpu")  # the trainers' group state, which MoCo's gathers follow
    try:
        m = _tiny(queue_size=8, bn_splits=1)
        m.encoder_k.eval()  # per-sample forward: the shuffled key must equal the local one
        torch.manual_seed(100 + rank)  # different data and different local RNG per rank
        x = torch.randn(2, 3, 8, 8)
        k = m.key(x)
        local = F.normalize(m.encoder_k(x), dim=1)
        m.enqueue_(k)
        torch.save({"k": k, "local": local, "queue": m.queue, "ptr": m.queue_ptr}, f"{result_path}.{rank}")
    finally:
        fdist.shutdown()


def test_two_process_shuffle_bn_and_gathered_enqueue(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    path = str(tmp_path / "out")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), path), nprocs=2, join=True, start_method="fork")
    r0, r1 = torch.load(f"{path}.0"), torch.load(f"{path}.1")
    for r in (r0, r1):
        assert torch.allclose(r["k"], r["local"], atol=1e-6)
        assert r["ptr"].item() == 4
    assert torch.equal(r0["queue"], r1["queue"])  # every rank enqueues all ranks' keys, in rank order
    assert torch.allclose(r0["queue"][:4], torch.cat([r0["k"], r1["k"]]), atol=1e-6)


@pytest.mark.cuda
def test_key_momentum_update_and_enqueue_replay_in_a_cuda_graph() -> None:
    m = _tiny(queue_size=10, bn_splits=2).cuda()
    m.encoder_k.eval()  # keys independent of the shuffle, so graph and eager runs can be compared
    ref = copy.deepcopy(m)
    static_x = torch.randn(4, 3, 8, 8, device="cuda")

    def step(model: MoCo, x: torch.Tensor) -> None:
        k = model.key(x)
        model.momentum_update_()
        model.enqueue_(k)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: one real step outside the graph
        step(m, static_x)
    torch.cuda.current_stream().wait_stream(side)
    step(ref, static_x.clone())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(m, static_x)
    for i in range(3):
        x = torch.randn(4, 3, 8, 8, device="cuda")
        with torch.no_grad():
            for a, b in zip(m.encoder_q.parameters(), ref.encoder_q.parameters()):
                delta = torch.randn_like(a) * 0.1  # the "optimizer step" between replays
                a.add_(delta)
                b.add_(delta)
        static_x.copy_(x)
        graph.replay()
        step(ref, x)
        torch.cuda.synchronize()
        assert m.queue_ptr.item() == ref.queue_ptr.item() == (4 * (i + 2)) % 10
        assert torch.allclose(m.queue, ref.queue, atol=1e-5)
        for a, b in zip(m.encoder_k.parameters(), ref.encoder_k.parameters()):
            assert torch.allclose(a, b, atol=1e-6)
