"""The traffic model (benchmarks/traffic.py) on functions whose cost is known, and the guard it gives the
fixed-shape augmentation path against regressions in bytes, kernels and host syncs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import traffic as T  # noqa: E402

N = 1000


def test_elementwise_add_is_one_kernel_reading_two_writing_one() -> None:
    a, b = torch.rand(N), torch.rand(N)
    tr = T.count_traffic(torch.add, a, b)
    assert (tr.kernels, tr.bytes, tr.syncs, tr.flops) == (1, 3 * N * 4, 0, 0)
    assert tr.by_op == [("add", 1, 3 * N * 4)]


def test_views_and_allocations_are_free() -> None:
    x = torch.rand(4, 3, 10, 10)

    def views() -> None:
        y = x.view(4, 300).permute(1, 0)[2:7]
        y.unbind(0)
        x.expand(2, 4, 3, 10, 10).detach()
        x.as_strided((5,), (1,))
        torch.empty(100)

    tr = T.count_traffic(views)
    assert (tr.kernels, tr.bytes) == (0, 0)


def test_in_place_out_and_broadcast_operands() -> None:
    a, b, out = torch.rand(N), torch.rand(N), torch.empty(N)
    assert T.count_traffic(lambda: a.add_(b)).bytes == 3 * N * 4  # read a, read b, write a
    assert T.count_traffic(lambda: torch.add(a, b, out=out)).bytes == 3 * N * 4  # out= is written only
    s = torch.rand(1)
    assert T.count_traffic(lambda: a * s.expand(N)).bytes == (2 * N + 1) * 4  # a stride-0 operand once


def test_strided_plane_costs_its_sectors_and_gather_reads_what_it_writes() -> None:
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    plane = 2 * 8 * 8 * 4
    # a channel of channels-last memory: every third float, so every 32-byte sector is touched (x3)
    assert T.count_traffic(lambda: x[:, 0] * 2.0).bytes == 3 * plane + plane
    store = torch.randint(0, 255, (100_000, 3), dtype=torch.uint8)
    idx = torch.randint(0, 100_000, (50,))
    tr = T.count_traffic(lambda: store[idx])
    assert tr.bytes == 50 * 3 + 50 * 8 + 50 * 3  # indexed rows, the index, the output (not the store)


def test_syncs_and_flops_are_counted() -> None:
    x = torch.rand(N)
    assert T.count_traffic(lambda: (x > 0.5).nonzero()).syncs == 1
    assert T.count_traffic(lambda: x.sum().item()).syncs == 1
    a, b = torch.rand(2, 5, 7), torch.rand(2, 7, 3)
    assert T.count_traffic(torch.bmm, a, b).flops == 2 * 2 * 5 * 7 * 3


def _fixed_shape_render_traffic(batch: int, res: int) -> T.Traffic:
    from fastvpd.data.augment import PixelAugmenter
    from fastvpd.data.spec import moco_v2

    pixels, offsets, H, W = T.synthetic_store(batch)
    aug = PixelAugmenter(moco_v2(res), pixels, offsets, H, W, torch.float32, torch.Generator().manual_seed(0))
    plane = batch * res * res * 4
    return T.count_traffic(lambda: aug.render(pixels, offsets, H, W, fixed_shape=True), large_bytes=plane)


@pytest.mark.parametrize("res", [32, 48])
def test_fixed_shape_moco_v2_render_stays_lean(res: int) -> None:
    """Regression guard. Before the rewrite the two-view render moved ~199 whole-batch fp32 images per view
    (758 kernels, 336 of them whole-batch passes); now ~80 (526 kernels, 88 passes). No host syncs."""
    batch = 4
    tr = _fixed_shape_render_traffic(batch, res)
    image = batch * 3 * res * res * 4  # one [B, 3, H, W] float32 batch
    assert tr.syncs == 0
    assert tr.bytes / (2 * image) < 100, tr.table()
    assert tr.kernels < 580 and tr.large < 110, tr.table()


def test_cli_report_is_labelled_as_a_model() -> None:
    out = T.aug_report(batch=2, res=24, tbs=3.0, reps=1)
    assert "scaled linearly to batch 256" in out and "MODEL, not a measurement" in out
    assert "host syncs: 0" in out


# ---------------------------------------------------------------------------------- training-step model
def _tiny_step(net: str, batch: int) -> T.Traffic:
    step = T.step_fn(net, "resnet18", 16, batch, amp=None)
    step()  # the optimizer's momentum buffers exist from the second step on, as in training
    return T.count_traffic(step)


def test_step_model_fits_fixed_plus_per_sample_and_extrapolates() -> None:
    """Two counts give fixed + per-sample bytes; a third batch lands on the line (activations scale with the
    batch, the optimizer and momentum update do not), and the fixed part is about the parameter traffic."""
    m = T.step_model("moco", "resnet18", 16, (8, 16), amp=None)
    at24 = _tiny_step("moco", 24)
    assert abs(m.bytes_at(24) - at24.bytes) / at24.bytes < 0.01
    assert abs(m.flops_at(24) - at24.flops) / at24.flops < 0.01
    optimizer = [(fixed, per) for op, _, fixed, per in m.rows if op.startswith("_foreach")]
    assert optimizer and all(fixed > 0 and abs(per) < 1 for fixed, per in optimizer)  # batch-independent
    report = T.step_report(m, 256, tbs=3.0, tflops=989.0)
    assert "MODEL, not a measurement" in report and "moco step, resnet18 at 16 px, torch.float32" in report


def test_batch_norm_in_training_is_a_statistics_pass_plus_an_elementwise_pass() -> None:
    x = torch.rand(8, 4, 5, 5)
    w, b, rm, rv = torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4)
    plane = x.numel() * 4
    train = T.count_traffic(lambda: torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5))
    evals = T.count_traffic(lambda: torch.ops.aten.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5))
    assert train.kernels == 2 and evals.kernels == 1
    assert train.bytes - plane == 2 * plane + 4 * 4 * 4  # x twice, y once; weight, bias, mean, invstd
    assert evals.bytes - plane == plane + 4 * 4 * 4  # x once, y once; weight, bias, running mean, var


def test_split_bn_is_one_bn_call_per_group_and_pass() -> None:
    """Split-BN's block form runs PyTorch's BN once per group: two kernels each (statistics, then the
    elementwise pass), so the model counts 2 encoders x 20 BN layers x 8 groups x 2 passes."""
    calls = {op: c for op, c, _ in _tiny_step("moco", 16).by_op}
    assert calls["native_batch_norm"] == 2 * 20 * 8 * 2


def test_distill_step_is_modelled() -> None:
    m = T.step_model("distill", "resnet18", 16, (8, 16), amp=None)
    assert m.sample_bytes > 0 and m.flops_at(256) > 0 and m.kernels > 0


def test_step_cli_mistakes_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, said in (
        (["moco", "--batches", "16,8"], "two increasing batch sizes"),
        (["nonsense"], "invalid choice"),
    ):
        with pytest.raises(SystemExit) as e:
            T.main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err
