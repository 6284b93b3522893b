"""Backbones, feature taps, split-BN and export."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from fastvpd.config import ConfigError
from fastvpd.models import (
    FeatureTaps,
    MLPHead,
    SplitBatchNorm,
    StemConv,
    adapt_stem,
    backbone_state_for_torchvision,
    build_backbone,
    convert_split_bn,
    stage_bn,
    stage_channels,
    to_channels_last,
)


@pytest.mark.parametrize(("arch", "dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_build_backbone_outputs_pooled_features(arch: str, dim: int) -> None:
    net = build_backbone(arch).eval()
    assert net.feat_dim == dim and isinstance(net.fc, nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_small_stem_keeps_resolution_and_unknown_arch_is_a_config_error() -> None:
    net = build_backbone("resnet18", small_stem=True).eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    feats, _ = FeatureTaps(net)(torch.randn(1, 3, 32, 32))
    assert feats[-1].shape[-2:] == (4, 4)
    with pytest.raises(ConfigError, match="model.arch"):
        build_backbone("vgg16")


def test_mlp_head_shapes() -> None:
    head = MLPHead(8, 16, 4)
    assert [type(m) for m in head.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert isinstance(MLPHead(8, 0, 4).net, nn.Linear)
    assert head(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.parametrize(("arch", "train"), [("resnet18", False), ("resnet18", True), ("resnet50", True)])
def test_feature_taps_bit_identical_and_pre_relu(arch: str, train: bool) -> None:
    torch.manual_seed(0)
    net = build_backbone(arch, small_stem=True)
    net.train(train)
    for m in net.modules():  # non-trivial BN affine so stage outputs are not all post-ReLU-like
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
            m.momentum = 0.0  # two forwards below must see the same running stats in eval
    x = torch.randn(4, 3, 8, 8)
    stage_out: list[torch.Tensor] = []
    hooks = [
        getattr(net, n).register_forward_hook(lambda m, i, o: stage_out.append(o))
        for n in ("layer1", "layer2", "layer3", "layer4")
    ]
    plain = net(x)
    for h in hooks:
        h.remove()
    feats, pooled = FeatureTaps(net)(x)
    assert torch.equal(pooled, plain)
    assert [f.shape[1] for f in feats] == stage_channels(net)
    for f, o in zip(feats, stage_out):
        assert torch.equal(F.relu(f), o)
        assert (f < 0).any()  # pre-ReLU: negative responses are kept


def test_stage_bn_and_channels() -> None:
    r50, r18 = build_backbone("resnet50"), build_backbone("resnet18")
    assert stage_bn(r50)[0] is r50.layer1[-1].bn3 and stage_bn(r50)[3] is r50.layer4[-1].bn3
    assert stage_bn(r18)[2] is r18.layer3[-1].bn2
    assert stage_channels(r50) == [256, 512, 1024, 2048]
    assert stage_channels(r18) == [64, 128, 256, 512]


def _moco_colab_split_bn(x: torch.Tensor, bn: nn.BatchNorm2d, s: int) -> torch.Tensor:
    """MoCo colab's SplitBatchNorm.forward (training branch), verbatim maths, on a copy of bn's buffers."""
    n, c, h, w = x.shape
    rm, rv = bn.running_mean.repeat(s), bn.running_var.repeat(s)
    out = F.batch_norm(
        x.contiguous().view(-1, c * s, h, w),
        rm,
        rv,
        bn.weight.repeat(s),
        bn.bias.repeat(s),
        True,
        bn.momentum,
        bn.eps,
    ).view(n, c, h, w)
    bn.running_mean.copy_(rm.view(s, c).mean(0))
    bn.running_var.copy_(rv.view(s, c).mean(0))
    return out


def _interleave(t: torch.Tensor, s: int) -> torch.Tensor:
    """Reorder a batch so the colab's group b (samples b, b+S, ...) is our block b, in order."""
    n = t.shape[0]
    return t.reshape(s, n // s, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _split_and_plain_bn(c: int, s: int, **kw: bool) -> tuple[SplitBatchNorm, nn.BatchNorm2d]:
    """A SplitBatchNorm with non-trivial affine parameters, and a plain BatchNorm2d with the same state."""
    split = SplitBatchNorm(c, s, **kw)
    if split.affine:
        nn.init.normal_(split.weight, 1.0, 0.3)
        nn.init.normal_(split.bias, 0.0, 0.3)
    plain = nn.BatchNorm2d(c, **kw)
    plain.load_state_dict(split.state_dict(), strict=False)
    return split, plain


def test_split_bn_matches_moco_colab_and_per_group_batchnorm() -> None:
    torch.manual_seed(0)
    s, c = 4, 3
    split, ref_bn = _split_and_plain_bn(c, s)
    x = (torch.randn(8, c, 5, 5) * 2 + 1).requires_grad_()
    x_ref = _interleave(x.detach(), s).requires_grad_()  # the colab's groups = our blocks
    for _ in range(2):  # two steps: running stats compound correctly
        y = split(x)
        with torch.no_grad():
            y_ref = _moco_colab_split_bn(x_ref, ref_bn, s)
        assert torch.allclose(_interleave(y, s), y_ref, atol=1e-5)
        assert torch.allclose(split.running_mean, ref_bn.running_mean, atol=1e-6)
        assert torch.allclose(split.running_var, ref_bn.running_var, atol=1e-6)
    # Group b = the contiguous block b·N/S ... (b+1)·N/S - 1, normalised with its own statistics (by hand).
    per = x.shape[0] // s
    for b in range(s):
        xb = x.detach()[b * per : (b + 1) * per]
        mean = xb.mean(dim=(0, 2, 3), keepdim=True)
        var = xb.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        want = (xb - mean) / torch.sqrt(var + split.eps) * split.weight.view(1, c, 1, 1) + split.bias.view(
            1, c, 1, 1
        )
        assert torch.allclose(y.detach()[b * per : (b + 1) * per], want.detach(), atol=1e-5)
    # Gradients equal the MoCo colab version's (on the reordered batch).
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x_ref.grad = None
    w = split.weight.detach().clone().requires_grad_()
    b_ = split.bias.detach().clone().requires_grad_()
    y2 = F.batch_norm(
        x_ref.view(-1, c * s, 5, 5), None, None, w.repeat(s), b_.repeat(s), True, 0.1, split.eps
    )
    (y2.view_as(x_ref) * _interleave(g, s)).sum().backward()
    assert torch.allclose(_interleave(x.grad, s), x_ref.grad, atol=1e-5)
    assert torch.allclose(split.weight.grad, w.grad, atol=1e-4)
    assert split.num_batches_tracked.item() == 2


def test_split_bn_channels_last_eval_and_conversion() -> None:
    torch.manual_seed(1)
    net = build_backbone("resnet18", small_stem=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.running_mean, 0, 0.1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    convert_split_bn(net, 2)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SplitBatchNorm) and m.num_splits == 2 for m in bns)
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(4, 3, 8, 8)
    split = SplitBatchNorm(8, 2).train()
    xc = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    y = split(xc)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, SplitBatchNorm(8, 2)(xc.contiguous()), atol=1e-6)
    net.eval()
    plain = build_backbone("resnet18", small_stem=True).eval()
    plain.load_state_dict(before)
    assert torch.allclose(net(x), plain(x), atol=1e-6)  # eval = plain BN
    assert convert_split_bn(plain, 1) is plain and not any(
        isinstance(m, SplitBatchNorm) for m in plain.modules()
    )
    with pytest.raises(ValueError, match="divisible"):
        SplitBatchNorm(8, 3)(torch.randn(4, 8, 2, 2))


def test_to_channels_last() -> None:
    net = to_channels_last(build_backbone("resnet18"))
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("channels", "impl"), [(4, "direct"), (8, "direct"), (3, "s2d"), (4, "s2d"), (3, "im2col"), (8, "im2col")]
)
def test_adapted_stem_is_the_same_convolution_with_the_same_parameters(channels: int, impl: str) -> None:
    """adapt_stem (channels, impl): outputs, gradients and state dict of the 3-channel stem; the
    optimizer's Parameter objects kept; channels-last in, channels-last through."""
    torch.manual_seed(3)
    plain = to_channels_last(build_backbone("resnet18"))
    adapted = to_channels_last(build_backbone("resnet18"))
    adapted.load_state_dict(plain.state_dict())
    weight = adapted.conv1.weight
    assert adapt_stem(adapted, channels, impl) == 1
    assert isinstance(adapted.conv1, StemConv) and adapted.conv1.weight is weight
    assert adapted.conv1.weight.shape == (64, 3, 7, 7)
    assert adapted.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 3, 48, 47).to(memory_format=torch.channels_last)  # odd width: the s2d edge
    seen = []
    adapted.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    a, b = plain(x), adapted(x)
    assert seen == [3]  # the rewrite happens inside the stem: the module takes the 3-channel image
    torch.testing.assert_close(adapted.conv1(x), plain.conv1(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # float sums in another order, through BN
    stem = adapted.conv1(x)
    assert stem.is_contiguous(memory_format=torch.channels_last)
    up = torch.randn_like(stem)  # the stem's weight gradient for one upstream gradient
    (want,) = torch.autograd.grad(plain.conv1(x), plain.conv1.weight, up)
    (got,) = torch.autograd.grad(stem, weight, up)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    a.square().sum().backward()  # and through the network: float sums in another order, through BN
    b.square().sum().backward()
    g_plain, g_adapted = plain.conv1.weight.grad, adapted.conv1.weight.grad
    assert (g_adapted - g_plain).norm() <= 1e-4 * g_plain.norm()  # 1.5e-5 measured


def test_stem_space_to_depth_matches_conv2d_at_the_papers_sizes() -> None:
    """The 7x7/2 stem at 224 and 448 px (the bag of tricks' resolution) and at an odd size, against
    F.conv2d directly: every output position, including the padded border."""
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    for size in (224, 448, 33):
        x = torch.randn(1, 3, size, size).to(memory_format=torch.channels_last)
        want = F.conv2d(x, conv.weight, None, 2, 3)
        for impl in ("s2d", "im2col"):
            net = build_backbone("resnet18")
            net.conv1.weight.data.copy_(conv.weight)
            adapt_stem(net, 3, impl)
            torch.testing.assert_close(net.conv1(x), want, rtol=1e-5, atol=1e-5, msg=f"{impl} {size}")


def test_adapt_stem_rejects_what_it_cannot_rewrite() -> None:
    """One ConfigError naming the key: below 3 channels, an unknown form, space-to-depth on the 32-px
    stride-1 small stem (padding it works there); (3, direct) leaves the model untouched."""
    plain = build_backbone("resnet18")
    assert adapt_stem(plain, 3, "direct") == 0 and type(plain.conv1) is nn.Conv2d
    with pytest.raises(ConfigError, match="stem_channels"):
        adapt_stem(plain, 2)
    with pytest.raises(ConfigError, match="stem_impl='fft' is not one of direct, s2d, im2col"):
        adapt_stem(plain, 3, "fft")
    small = build_backbone("resnet18", small_stem=True)
    with pytest.raises(ConfigError, match="stem_impl=s2d needs .* stride 2"):
        adapt_stem(small, 3, "s2d")
    assert type(small.conv1) is nn.Conv2d  # nothing half-converted
    assert adapt_stem(small, 3, "im2col") == 1
    x = torch.randn(2, 3, 8, 8)
    small.eval()
    want = F.conv2d(x, small.conv1.weight, None, 1, 1)
    torch.testing.assert_close(small.conv1(x), want, rtol=1e-5, atol=1e-5)


def test_export_loads_into_torchvision() -> None:
    torch.manual_seed(2)
    net = convert_split_bn(build_backbone("resnet18"), 2)
    net.train()
    net(torch.randn(4, 3, 32, 32))  # move the running stats off their init
    net.eval()
    sd = backbone_state_for_torchvision(net)
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(tv.eval()(x), net(x), atol=1e-6)
    sd10 = backbone_state_for_torchvision(net, num_classes=10)
    torchvision.models.resnet18(num_classes=10).load_state_dict(sd10, strict=True)
    prefixed = {f"module.{k}": v for k, v in net.state_dict().items()}
    holder = nn.Module()
    holder.state_dict = lambda: prefixed  # type: ignore[method-assign]  # DDP / compile prefixes are stripped
    assert set(backbone_state_for_torchvision(holder)) == set(sd)


def _blocks_then_cat(x: torch.Tensor, bn: nn.BatchNorm2d, s: int) -> torch.Tensor:
    """The obvious split-BN: F.batch_norm per contiguous block, running stats averaged, then cat."""
    track = bn.running_mean is not None
    rm = bn.running_mean.repeat(s, 1) if track else None
    rv = bn.running_var.repeat(s, 1) if track else None
    outs = [
        F.batch_norm(
            xb,
            rm[b] if track else None,
            rv[b] if track else None,
            bn.weight,
            bn.bias,
            True,
            bn.momentum,
            bn.eps,
        )
        for b, xb in enumerate(x.chunk(s))
    ]
    if track:
        with torch.no_grad():
            bn.running_mean.copy_(rm.mean(0))
            bn.running_var.copy_(rv.mean(0))
    return torch.cat(outs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_split_bn_writes_blocks_in_place_equal_to_blocks_then_cat(
    channels_last: bool, affine: bool, track: bool
) -> None:
    """The no-cat split-BN runs the same BN kernels per block: bit-identical output and input gradient."""
    torch.manual_seed(3)
    s, c = 4, 6
    split, ref = _split_and_plain_bn(c, s, affine=affine, track_running_stats=track)
    x = torch.randn(8, c, 5, 5) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = split(x1), _blocks_then_cat(x2, ref, s)
    assert torch.equal(y, y_ref)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    if track:
        assert torch.equal(split.running_mean, ref.running_mean)
        assert torch.equal(split.running_var, ref.running_var)
    g = torch.randn_like(y)
    params = [p for p in (split.weight, split.bias) if p is not None]
    params_ref = [p for p in (ref.weight, ref.bias) if p is not None]
    grads = torch.autograd.grad(y, [x1, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x2, *params_ref], g)
    assert torch.equal(grads[0], grads_ref[0])
    for a, b in zip(grads[1:], grads_ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # block sums: another summation order
    with torch.no_grad():  # the key encoder's case: no autograd graph at all
        assert torch.equal(split(x), _blocks_then_cat(x, ref, s))


def test_split_bn_under_torch_compile_is_one_pass_with_equal_results() -> None:
    """Under torch.compile the groups are one reduction over a view (what Inductor fuses); same maths."""
    torch.manual_seed(4)
    s, c = 4, 5
    eager, _ = _split_and_plain_bn(c, s)
    module = SplitBatchNorm(c, s)
    module.load_state_dict(eager.state_dict())
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    try:
        for _ in range(2):  # running statistics compound
            x = (torch.randn(8, c, 4, 4) * 3 + 2).contiguous(memory_format=torch.channels_last)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1, y2 = eager(x1), compiled(x2)
            torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
            g = torch.randn_like(y1)
            g1 = torch.autograd.grad(y1, (x1, eager.weight, eager.bias), g)
            g2 = torch.autograd.grad(y2, (x2, module.weight, module.bias), g)
            for a, b in zip(g2, g1):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(module.running_mean, eager.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(module.running_var, eager.running_var, atol=1e-5, rtol=1e-5)
        assert module.num_batches_tracked.item() == eager.num_batches_tracked.item() == 2
    finally:
        torch._dynamo.reset()
