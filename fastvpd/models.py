"""Backbones, heads and feature taps.

- `build_backbone`: a torchvision ResNet/ResNeXt (random init, nothing downloaded) with `fc = Identity`
  and a `feat_dim` attribute; optional small stem (3×3 stride-1 conv, no max-pool) for 32-px images.
- `FeatureTaps`: the four pre-ReLU stage outputs that OFD distils (the last block's residual sum before
  its ReLU) plus the pooled feature, bit-identical to the plain backbone's output.
- `SplitBatchNorm` / `convert_split_bn`: MoCo's single-device emulation of shuffle-BN.
- `backbone_state_for_torchvision`: export a backbone as a state dict for `torchvision.models.<arch>()`.
- `adapt_stem`: the stem convolution fed a zero-padded image or computed as space-to-depth or im2col +
  GEMM: same parameters, same results (a hook for benchmarks/, not a user setting).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fastvpd.config import Arch, ConfigError

__all__ = [
    "ARCHS",
    "build_backbone",
    "MLPHead",
    "FeatureTaps",
    "stage_bn",
    "stage_channels",
    "SplitBatchNorm",
    "convert_split_bn",
    "to_channels_last",
    "STEM_IMPLS",
    "StemConv",
    "adapt_stem",
    "backbone_state_for_torchvision",
]

ARCHS = tuple(a.value for a in Arch)  # model.arch's choices
STEM_IMPLS = ("direct", "s2d", "im2col")  # StemConv's forms
STAGES = ("layer1", "layer2", "layer3", "layer4")


def build_backbone(arch: str, small_stem: bool = False) -> ResNet:
    """A randomly initialised torchvision `arch` with `fc = Identity` (forward gives pooled features).

    small_stem: replace the 7×7/2 conv + max-pool by a 3×3/1 conv and no pooling, as MoCo's CIFAR
    recipe does, so 32-px inputs keep a 4×4 map at the last stage.
    """
    if arch not in ARCHS:
        raise ConfigError(f"model.arch={arch!r} is not one of {', '.join(ARCHS)}")
    net: ResNet = getattr(torchvision.models, arch)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        net.maxpool = nn.Identity()
    net.feat_dim = net.fc.in_features  # type: ignore[assignment]
    net.fc = nn.Identity()
    return net


class MLPHead(nn.Module):
    """MoCo v2 projection head: Linear-ReLU-Linear (hidden=0: a single Linear, as MoCo v1)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
            )
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _last_block_pre_relu(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision Bottleneck/BasicBlock forward without the final ReLU (the residual sum itself)."""
    identity = x if block.downsample is None else block.downsample(x)
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    elif isinstance(block, BasicBlock):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
    else:
        raise TypeError(f"FeatureTaps supports torchvision BasicBlock/Bottleneck, not {type(block).__name__}")
    out += identity
    return out


class FeatureTaps(nn.Module):
    """Run a `build_backbone` network and also return its four pre-ReLU stage outputs.

    forward(x) -> (feats, pooled): feats[i] is stage i's last block's residual sum before its ReLU (as OFD's
    `extract_feature(preReLU=True)`); the next stage consumes relu(feats[i]), so `pooled` is bit-identical
    to `backbone(x)`. Holds the backbone (no copy); its parameters are the backbone's.
    """

    def __init__(self, backbone: ResNet) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        feats: list[Tensor] = []
        for name in STAGES:
            blocks = list(getattr(net, name).children())
            for block in blocks[:-1]:
                x = block(x)
            pre = _last_block_pre_relu(blocks[-1], x)  # pre: NxC_ixH_ixW_i, may be negative
            feats.append(pre)
            x = F.relu(pre)  # not in place: `pre` is returned
        pooled = net.fc(torch.flatten(net.avgpool(x), 1))
        return feats, pooled


def stage_bn(backbone: ResNet) -> list[nn.BatchNorm2d]:
    """The BN right before each stage's final ReLU: bn3 (Bottleneck) or bn2 (BasicBlock) of its last block."""
    out = []
    for name in STAGES:
        last = list(getattr(backbone, name).children())[-1]
        out.append(last.bn3 if isinstance(last, Bottleneck) else last.bn2)
    return out


def stage_channels(backbone: ResNet) -> list[int]:
    """Channels of the four stage outputs (e.g. 256/512/1024/2048 for ResNet-50)."""
    return [bn.num_features for bn in stage_bn(backbone)]


_aten = torch.ops.aten


class _SplitBNFunction(torch.autograd.Function):
    """The split-BN autograd function's backward half: forward(x, weight, bias, running_mean, running_var,
    s, momentum, eps) saves (x, weight, mean [S, C], invstd [S, C]) through `_save`; the backward runs each
    block through `native_batch_norm_backward`, its input gradient copied into place (that kernel has no
    out= form)."""

    @staticmethod
    def _save(
        ctx: Any, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, s: int, eps: float
    ) -> None:
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.s, ctx.eps = s, eps

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        s, n = ctx.s, x.shape[0] // ctx.s
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        gy = gy.contiguous(memory_format=fmt)
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        mask = [want_x, weight is not None and want_w, weight is not None and want_b]
        gx = torch.empty_like(x) if want_x else None
        gw: list[Tensor] = []
        gb: list[Tensor] = []
        for b in range(s):
            blk = slice(b * n, (b + 1) * n)
            gxb, gwb, gbb = _aten.native_batch_norm_backward(
                gy[blk], x[blk], weight, None, None, save_mean[b], save_invstd[b], True, ctx.eps, mask
            )
            if gx is not None:
                gx[blk].copy_(gxb)
            if mask[1]:
                gw.append(gwb)
            if mask[2]:
                gb.append(gbb)
        grads = (gx, torch.stack(gw).sum(0) if gw else None, torch.stack(gb).sum(0) if gb else None)
        return (*grads, None, None, None, None, None)  # no gradient for the running stats, s, momentum, eps


def _running_from_groups(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, m: int, momentum: float
) -> None:
    """Running statistics updated with the average over groups of what each group's BN would write:
    mean, var (biased) [S, C] over m elements per group and channel."""
    unbiased = var * (m / max(m - 1, 1))
    running_mean.lerp_(mean.mean(0).to(running_mean.dtype), momentum)
    running_var.lerp_(unbiased.mean(0).to(running_var.dtype), momentum)


class _BlockBatchNorm(_SplitBNFunction):
    """Training-mode BN of each contiguous block of the batch, written in place into one output.

    Forward/backward run the same per-block kernels as `F.batch_norm` (`native_batch_norm` and its
    backward). The forward writes each block's output through `native_batch_norm.out` straight into its
    slice of one preallocated tensor, so no `cat` of the block outputs copies the full tensor again. The
    backward kernel has no real out= form, so the input gradient is copied into place once per block.
    Outputs equal
    `cat([F.batch_norm(block) ...])` bit for bit; the affine gradients are the block sums.
    """

    @staticmethod
    def forward(  # type: ignore[override]  # noqa: PLR0913
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        rm: Tensor | None,
        rv: Tensor | None,
        s: int,
        momentum: float,
        eps: float,
    ) -> Tensor:
        n = x.shape[0] // s
        y = torch.empty_like(x)  # keeps x's memory format: each block slice is then a dense view
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        save_mean = torch.empty(s, x.shape[1], dtype=acc, device=x.device)
        save_invstd = torch.empty_like(save_mean)
        for b in range(s):
            blk = slice(b * n, (b + 1) * n)
            _aten.native_batch_norm.out(
                x[blk],
                weight,
                bias,
                None if rm is None else rm[b],
                None if rv is None else rv[b],
                True,
                momentum,
                eps,
                out=y[blk],
                save_mean=save_mean[b],
                save_invstd=save_invstd[b],
            )
        _SplitBNFunction._save(ctx, x, weight, save_mean, save_invstd, s, eps)
        return y


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _split_bn_one_pass(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, s: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Split-BN as one reduction over the [S, N/S, C, H, W] view (fp32 statistics): (y, mean, var).

    The form for `torch.compile`: Inductor turns it into one fused statistics kernel and one
    normalisation kernel for all groups (eagerly it would stream fp32 temporaries). var is biased.
    """
    n, c = x.shape[0], x.shape[1]
    xs = x.unflatten(0, (s, n // s)).float()  # [S, N/S, C, H, W]
    dims = (1, *range(3, xs.dim()))
    var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)  # [S, 1, C, 1, 1]
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float().view(1, 1, c, *([1] * (xs.dim() - 3)))
    y = (xs - mean) * scale
    if bias is not None:
        y = y + bias.float().view(1, 1, c, *([1] * (xs.dim() - 3)))
    return y.flatten(0, 1).to(x.dtype), mean.view(s, c), var.view(s, c)


class SplitBatchNorm(nn.BatchNorm2d):
    """Split-BN: emulates per-GPU BN statistics (MoCo's shuffle-BN) on one device.

    Training: the batch is normalised in `num_splits` groups, each with its own mean/variance. Group b is
    the contiguous block of samples [b·N/S, (b+1)·N/S), as each GPU of a DDP run holds a contiguous block of
    the global batch (for the keys, of the shuffled batch). MoCo's CIFAR colab groups samples n % S
    instead (`input.view(-1, C * S, H, W)`); both are fixed partitions of a randomly ordered batch, so the
    statistics are the same in distribution, and blocks are what real shuffle-BN uses. The running
    statistics are updated with the average over groups of what each group's BN would have written
    (per-group unbiased variance), exactly the colab's `running_*_split.view(S, C).mean(0)`. Eval: plain BN.

    Eagerly (and in a CUDA graph) each block runs PyTorch's own BN kernels (`_BlockBatchNorm`), writing
    into one output with no `cat`. Under `torch.compile` the groups are one reduction over a view
    (`_split_bn_one_pass`) for Inductor to fuse.
    """

    def __init__(self, num_features: int, num_splits: int, **kw: object) -> None:
        super().__init__(num_features, **kw)  # type: ignore[arg-type]
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 (got {num_splits})")
        if self.momentum is None:
            raise ValueError("SplitBatchNorm needs a float momentum (cumulative averaging is not supported)")
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        n, s = x.shape[0], self.num_splits
        if n % s:
            raise ValueError(f"SplitBatchNorm: batch {n} is not divisible by num_splits={s}")
        track = self.track_running_stats and self.running_mean is not None
        mom: float = self.momentum  # type: ignore[assignment]
        rmean, rvar = (self.running_mean, self.running_var) if track else (None, None)
        if torch.compiler.is_compiling():
            y, mean, var = _split_bn_one_pass(x, self.weight, self.bias, s, self.eps)
            if rmean is not None and rvar is not None:
                with torch.no_grad():
                    _running_from_groups(rmean, rvar, mean, var, x.numel() // (s * x.shape[1]), mom)
        else:
            # rm, rv: SxC, row b = the running statistics group b's BN updates in place
            rm = rmean.repeat(s, 1) if rmean is not None else None
            rv = rvar.repeat(s, 1) if rvar is not None else None
            y = _BlockBatchNorm.apply(x, self.weight, self.bias, rm, rv, s, mom, self.eps)
            if rm is not None and rv is not None:
                with torch.no_grad():
                    self.running_mean.copy_(rm.mean(0))  # type: ignore[union-attr]
                    self.running_var.copy_(rv.mean(0))  # type: ignore[union-attr]
        if track:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a SplitBatchNorm with the same weights and buffers.

    num_splits == 1 leaves the module untouched. Returns the module (the root itself if it is a BN).
    """
    if num_splits <= 1:
        return module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        new = SplitBatchNorm(
            module.num_features,
            num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        ).to(device=module.weight.device if module.weight is not None else None)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_split_bn(child, num_splits))
    return module


def route(owner: nn.Module, name: str, wrapper: nn.Module | None) -> None:
    """Make `routed(owner, name)` return `wrapper` (a DDP around `owner.<name>`); None restores the raw call.

    The wrapper is kept in `owner.__dict__`, outside the module tree, so state_dict, checkpoints (no
    `module.` keys) and `.train()` keep seeing the raw submodule. A wrapper exposing `.module` (DDP does)
    must wrap that very submodule: one around a copy would train weights that are never checkpointed.
    """
    raw = getattr(owner, name)
    if wrapper is not None and (raw is None or getattr(wrapper, "module", raw) is not raw):
        raise ValueError(f"the {name} wrapper must wrap this {type(owner).__name__}'s own {name} module")
    owner.__dict__[f"_{name}_call"] = wrapper


def routed(owner: nn.Module, name: str) -> nn.Module:
    """What to call for `owner.<name>`: the wrapper set by `route`, else the raw submodule."""
    wrapper = owner.__dict__.get(f"_{name}_call")
    return wrapper if wrapper is not None else getattr(owner, name)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert 4-d parameters/buffers to channels-last (the layout cuDNN's fast bf16 convs want)."""
    return model.to(memory_format=torch.channels_last)


class StemConv(nn.Conv2d):
    """The stem convolution, computed another way (`channels`, `impl`).

    Why: given a 3-channel channels-last bf16 image, cuDNN pads it to 8 channels itself (its
    `nhwcAddPaddingKernel`) and may pick a slow kernel for the 7x7/2 stem (benchmarks/RESULTS.md has the
    profile; benchmarks/experiments/stems.py times the forms). Each form below is the same convolution
    (the extra zeros add nothing to any output), with the weight rearranged in the forward, so the
    parameters, the state dict and every result stay those of the 3-channel convolution:
    - `channels` > 3: the image and the weight zero-padded to that many input channels;
    - `impl="s2d"` (space-to-depth, stride-2 stems): each 2x2 block of pixels becomes 4*channels channels
      and the kxk/2 kernel (padded to an even size) a (k/2)x(k/2)/1 one: 7x7x8 (cuDNN's padding) = 392
      multiply-adds per output fall to 4x4x16 = 256 with `channels=4`, 4x4x12 = 192 as it is;
    - `impl="im2col"`: the k*k*channels patch of every output pixel written out as a row (padded to a
      multiple of 8) and one GEMM against the weight; its output rows are the NHWC (channels-last) layout.
    """

    channels: int = 3
    impl: str = "direct"

    def forward(self, x: Tensor) -> Tensor:
        extra = self.channels - x.shape[1]
        w = self.weight
        if extra > 0:
            pad = (0, 0, 0, 0, 0, extra)  # channels: F.pad keeps a channels-last input channels-last
            x, w = F.pad(x, pad), F.pad(w, pad)
        if self.impl == "s2d":
            return self._s2d(x, w)
        if self.impl == "im2col":
            return self._im2col(x, w)
        return self._conv_forward(x, w, self.bias)

    def _out_size(self, n: int, d: int) -> int:
        return (n + 2 * self.padding[d] - self.kernel_size[d]) // self.stride[d] + 1

    def _s2d(self, x: Tensor, w: Tensor) -> Tensor:
        """Output o reads input rows 2o - p + t (t < k). A leading zero tap (odd k) makes that 2o - f + t'
        (f = p + lead, t' < k' even), i.e. 2x2 block o + t'//2 of the input padded by f, phase t' % 2:
        a valid (k'/2)-wide stride-1 convolution over the blocks."""
        n, c, h, wd = x.shape
        o, k = w.shape[0], self.kernel_size[0]
        lead = k % 2
        kb = (k + lead) // 2  # the kernel's size in blocks
        ho, wo = self._out_size(h, 0), self._out_size(wd, 1)
        f = self.padding[0] + lead
        hp, wp = 2 * (ho + kb - 1), 2 * (wo + kb - 1)  # padded extent the blocks cover
        nhwc = x.permute(0, 2, 3, 1)  # a channels-last input: a view
        nhwc = F.pad(nhwc, (0, 0, f, wp - f - wd, f, hp - f - h))
        # [N, Hp/2, 2, Wp/2, 2, C] -> [N, Hp/2, Wp/2, C, 2, 2]: channel index c*4 + row phase*2 + col phase
        blocks = nhwc.reshape(n, hp // 2, 2, wp // 2, 2, c).permute(0, 1, 3, 5, 2, 4)
        xs = blocks.reshape(n, hp // 2, wp // 2, 4 * c).permute(0, 3, 1, 2)  # channels-last NCHW
        # weight [O, C, k, k] -> [O, C, 2kb, 2kb] (a leading zero tap) -> [O, C, kb, 2, kb, 2]
        # -> [O, 4C, kb, kb], channels in the input's order
        wk = F.pad(w, (lead, 0, lead, 0)).reshape(o, c, kb, 2, kb, 2).permute(0, 1, 3, 5, 2, 4)
        wk = wk.reshape(o, 4 * c, kb, kb).contiguous(memory_format=torch.channels_last)
        return F.conv2d(xs, wk, self.bias)

    def _im2col(self, x: Tensor, w: Tensor) -> Tensor:
        n, c, h, wd = x.shape
        o, k = w.shape[0], self.kernel_size[0]
        ho, wo = self._out_size(h, 0), self._out_size(wd, 1)
        p, s = self.padding[0], self.stride[0]
        nhwc = F.pad(x.permute(0, 2, 3, 1), (0, 0, p, p, p, p))
        # [N, Ho, Wp, C, k] -> [N, Ho, Wo, C, k, k]: the patch in the weight's (C, kh, kw) order
        patches = nhwc.unfold(1, k, s).unfold(2, k, s)[:, :ho, :wo]
        kk = c * k * k
        kpad = -kk % 8  # bf16 GEMM operands want rows of a multiple of 16 bytes
        # the patch matrix (the big tensor: 1 GB at 224 px, batch 256, bf16) written once, pad included
        a = patches.new_empty(n * ho * wo, kk + kpad)
        a[:, kk:].zero_()
        a[:, :kk].view(n, ho, wo, c, k, k).copy_(patches)
        b = F.pad(w.reshape(o, kk), (0, kpad))
        out = a @ b.t()  # [N*Ho*Wo, O]: NHWC rows
        if self.bias is not None:
            out = out + self.bias
        return out.view(n, ho, wo, o).permute(0, 3, 1, 2)  # channels-last NCHW, no copy

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input channels {self.channels}, computed as {self.impl}"


def adapt_stem(model: nn.Module, channels: int = 3, impl: str = "direct") -> int:
    """Give every ResNet in `model` a `StemConv` stem (`channels`, `impl`);
    returns how many. (3, "direct") leaves the model as it is. Call it before `torch.compile` and before
    building DDP wrappers."""
    if channels < 3:
        raise ConfigError(f"stem_channels={channels} must be at least 3 (the image's channels)")
    if impl not in STEM_IMPLS:
        raise ConfigError(f"stem_impl={impl!r} is not one of {', '.join(STEM_IMPLS)}")
    if channels == 3 and impl == "direct":
        return 0
    stems = [m.conv1 for m in model.modules() if isinstance(m, ResNet)]
    stems = [c for c in stems if isinstance(c, nn.Conv2d) and c.in_channels == 3 and c.groups == 1]
    for conv in stems:
        square = conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
        plain = square and conv.padding[0] == conv.padding[1] and conv.dilation == (1, 1)
        if (impl != "direct" and not plain) or (impl == "s2d" and conv.stride[0] != 2):
            raise ConfigError(
                f"stem_impl={impl} needs a square, undilated stem"
                f"{' of stride 2' if impl == 's2d' else ''} (this one: {conv}); use stem_impl=direct"
            )
    for conv in stems:  # the module itself becomes a StemConv: parameters, hooks, optimizers kept
        conv.__class__ = StemConv
        conv.channels, conv.impl = channels, impl
    return len(stems)


WRAPPERS = ("module", "_orig_mod")  # the key components DDP and torch.compile add


def unwrapped_key(key: str) -> str:
    """A state-dict key without the components DDP (`module`) and torch.compile (`_orig_mod`) add."""
    return ".".join(p for p in key.split(".") if p and p not in WRAPPERS)


def backbone_state_for_torchvision(backbone: nn.Module, num_classes: int | None = None) -> dict[str, Tensor]:
    """A CPU state dict of `backbone` with torchvision's key names (split-BN keeps BN's; wrappers dropped).

    No fc: load with `strict=False`, or pass `num_classes` for a freshly initialised fc (`strict=True`).
    A small-stem backbone has a 3×3 conv1: load it into `build_backbone(arch, small_stem=True)` instead.
    """
    out: dict[str, Tensor] = {}
    for key, val in backbone.state_dict().items():
        key = unwrapped_key(key)
        if key.startswith("fc."):
            continue
        out[key] = val.detach().to("cpu", copy=True).contiguous()
    if num_classes is not None:
        inner = backbone
        while isinstance(getattr(inner, "module", None), nn.Module) or hasattr(inner, "_orig_mod"):
            inner = getattr(inner, "module", None) or inner._orig_mod  # type: ignore[assignment]
        fc = nn.Linear(stage_channels(inner)[-1], num_classes)  # type: ignore[arg-type]
        out["fc.weight"], out["fc.bias"] = fc.weight.detach().clone(), fc.bias.detach().clone()
    return out
