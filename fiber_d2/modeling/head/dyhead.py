"""DyHead tower: scale-, spatial- and task-aware attention blocks over the FPN pyramid.

Each :class:`DyConv` block mixes every pyramid level with its two neighbours through three
modulated deformable 3x3 convolutions that share one offset/mask tensor computed from the
level itself (spec 3.1), fuses them with a scale attention and applies DyReLU. Parameter names
(``DyConv.{k}.conv``, ``DyConv.{k}.bn``, ``AttnConv.1``, ``relu.fc.{0,2}``, ``offset``) are the
ones used by released FIBER weights.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import deform_conv2d

__all__ = [
    "modulated_deform_conv3x3",
    "deform_conv3x3_by_sampling",
    "RecomputedSamplingDeformConv3x3",
    "ModulatedDeformConv3x3",
    "Conv3x3Norm",
    "DyReLU",
    "DyConv",
    "DyHead",
]

logger = logging.getLogger(__name__)

_KERNEL_TAPS = 9  # 3x3 kernel


def _conv_out_size(size: int, stride: int) -> int:
    """Output length of a 3x3 convolution with padding 1."""
    return (size + 2 - 3) // stride + 1


def modulated_deform_conv3x3(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int = 1,
    recompute: bool = True,
) -> Tensor:
    """Modulated deformable 3x3 convolution (padding 1) with the original kernel's buffer reads.

    The CUDA kernel of the original DyHead never checks the offset size: for each sample it reads
    the first ``18 * h_out * w_out`` values of that sample's offset block (and the first
    ``9 * h_out * w_out`` values of its mask block) in memory order, as if they had shape
    ``(18, h_out, w_out)``. When the offset/mask maps are larger than the output (the coarser-level
    branch of :class:`DyConv`), this function reproduces that read explicitly before calling
    ``torchvision.ops.deform_conv2d``. The computation runs in fp32, also under autocast.

    Args:
        x: input map, shape (B, C_in, H_in, W_in).
        offset: offsets, shape (B, 18, H_o, W_o), (dy, dx) per kernel tap, tap-major;
            ``H_o * W_o`` must be at least the number of output positions.
        mask: modulation mask (already passed through a sigmoid), shape (B, 9, H_o, W_o).
        weight: kernel, shape (C_out, C_in, 3, 3).
        bias: bias, shape (C_out,), or None.
        stride: convolution stride.
        recompute: on the CPU, when gradients are needed, keep only the inputs for the backward
            pass and sample again there (:class:`RecomputedSamplingDeformConv3x3`); False keeps the
            9 sampled copies of the input (about 9x its size) alive until the backward pass.

    Returns:
        Tensor of shape (B, C_out, h_out, w_out), fp32, with ``h_out = (H_in - 1) // stride + 1``.
    """
    if x.dim() != 4 or offset.dim() != 4 or mask.dim() != 4:
        raise ValueError(
            f"expected 4-d input/offset/mask, got {tuple(x.shape)}, {tuple(offset.shape)}, "
            f"{tuple(mask.shape)}"
        )
    batch = x.shape[0]
    if offset.shape[0] != batch or mask.shape[0] != batch:
        raise ValueError(
            f"batch mismatch: input {batch}, offset {offset.shape[0]}, mask {mask.shape[0]}"
        )
    if offset.shape[1] != 2 * _KERNEL_TAPS or mask.shape[1] != _KERNEL_TAPS:
        raise ValueError(
            f"offset must have 18 and mask 9 channels, got {offset.shape[1]} and {mask.shape[1]}"
        )
    out_h = _conv_out_size(x.shape[2], stride)
    out_w = _conv_out_size(x.shape[3], stride)
    n_out = out_h * out_w
    if (offset.shape[2], offset.shape[3]) != (out_h, out_w):
        if offset.shape[2] * offset.shape[3] < n_out:
            raise ValueError(
                f"offset map {tuple(offset.shape[2:])} holds fewer positions than the conv output "
                f"({out_h}, {out_w})"
            )
        # Reinterpret the prefix of each sample's buffer, as the original kernel does.
        offset = offset.reshape(batch, -1)[:, : 2 * _KERNEL_TAPS * n_out]
        offset = offset.reshape(batch, 2 * _KERNEL_TAPS, out_h, out_w)
        mask = mask.reshape(batch, -1)[:, : _KERNEL_TAPS * n_out]
        mask = mask.reshape(batch, _KERNEL_TAPS, out_h, out_w)
    with torch.autocast(device_type=x.device.type, enabled=False):
        args = (x.float(), offset.float(), mask.float(), weight.float())
        bias = None if bias is None else bias.float()
        if x.device.type == "cpu":
            if recompute and torch.is_grad_enabled():
                return RecomputedSamplingDeformConv3x3.apply(*args, bias, stride)
            return deform_conv3x3_by_sampling(*args, bias, stride=stride)
        return deform_conv2d(
            args[0], args[1], args[3], bias, stride=stride, padding=1, mask=args[2]
        )


def deform_conv3x3_by_sampling(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, stride: int = 1
) -> Tensor:
    """The same modulated deformable 3x3 convolution (padding 1) as bilinear sampling + a matmul.

    Numerically equal to ``torchvision.ops.deform_conv2d`` (zero outside the map, (dy, dx) per tap),
    but its backward is an order of magnitude faster on the CPU, where torchvision's deformable
    backward is the bottleneck of a training step. All 9 taps are sampled in one ``grid_sample``.

    Args:
        x: (B, C_in, H, W); offset: (B, 18, h, w); mask: (B, 9, h, w) with (h, w) the output size;
        weight: (C_out, C_in, 3, 3); bias: (C_out,) or None.

    Returns:
        (B, C_out, h, w).
    """
    b, c, height, width = x.shape
    h, w = offset.shape[-2:]
    taps = torch.arange(_KERNEL_TAPS, device=x.device)
    ky, kx = (taps // 3 - 1).to(x.dtype), (taps % 3 - 1).to(x.dtype)  # padding 1
    ys = torch.arange(h, device=x.device, dtype=x.dtype) * stride
    xs = torch.arange(w, device=x.device, dtype=x.dtype) * stride
    off = offset.view(b, _KERNEL_TAPS, 2, h, w)
    sample_y = ys.view(1, 1, h, 1) + ky.view(1, -1, 1, 1) + off[:, :, 0]  # (B, 9, h, w)
    sample_x = xs.view(1, 1, 1, w) + kx.view(1, -1, 1, 1) + off[:, :, 1]
    grid = torch.stack(
        [(2 * sample_x + 1) / width - 1, (2 * sample_y + 1) / height - 1], dim=-1
    )  # pixel centres under align_corners=False
    # Without autograd, grid_sample reads the input channels-last: its 4 corner reads per sample
    # are then contiguous over the channels (about 1.4x faster at FIBER-B's sizes), same values.
    # Export traces the autograd form.
    inference = not torch.is_grad_enabled() and not torch.jit.is_tracing()
    source = x.contiguous(memory_format=torch.channels_last) if inference else x
    sampled = F.grid_sample(
        source,
        grid.view(b, _KERNEL_TAPS * h, w, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    ).view(b, c, _KERNEL_TAPS, h, w)
    if inference:
        return _contract_taps_in_place(sampled, mask, weight, bias)
    sampled = sampled * mask.unsqueeze(1)
    out = torch.einsum("bckhw,ock->bohw", sampled, weight.reshape(weight.shape[0], c, _KERNEL_TAPS))
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _contract_taps_in_place(
    sampled: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """The tail of :func:`deform_conv3x3_by_sampling` without autograd: the same values, faster.

    The autograd path's outputs (bit for bit on the machines measured): the mask and bias are
    applied in place (``sampled`` is overwritten), and the taps are contracted by one GEMM per
    sample on the samples as they lie, where ``einsum`` (and ``torch.matmul``) first copy a batch
    of them into another layout, which made a batch of 4 prompt chunks 5x slower per chunk than
    one chunk at a time. Training keeps the ``einsum``, whose backward sums in another order (the
    Demo's from-scratch figures were measured with it).

    Args:
        sampled: (B, C_in, 9, h, w) bilinear samples, tap-major; mask: (B, 9, h, w);
        weight: (C_out, C_in, 3, 3); bias: (C_out,) or None.

    Returns:
        (B, C_out, h, w).
    """
    b, c, taps, h, w = sampled.shape
    sampled.mul_(mask.unsqueeze(1))
    columns = sampled.view(b, c * taps, h * w)
    kernel = weight.reshape(weight.shape[0], -1)
    out = columns.new_empty(b, kernel.shape[0], h * w)
    for i in range(b):
        torch.mm(kernel, columns[i], out=out[i])
    out = out.view(b, -1, h, w)
    if bias is not None:
        out.add_(bias.view(1, -1, 1, 1))
    return out


class RecomputedSamplingDeformConv3x3(torch.autograd.Function):
    """:func:`deform_conv3x3_by_sampling` that saves only its inputs for the backward pass.

    The sampling path keeps, per convolution, the sampled and the masked ``(B, C_in, 9, h, w)``
    tensors for its backward pass: 18x the input, about 3.5 GB per FIBER-B forward at 800 x 1344.
    This Function runs the forward without a graph and, in the backward pass, runs the same ops
    again on the saved inputs and differentiates them, so the gradients are those of the plain
    path while only one convolution's samples exist at a time.

    ``apply(x, offset, mask, weight, bias, stride)`` with the shapes of
    :func:`deform_conv3x3_by_sampling`; returns (B, C_out, h, w).
    """

    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride):  # noqa: D102
        ctx.stride = stride
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, offset, mask, weight)
        with torch.no_grad():
            return deform_conv3x3_by_sampling(x, offset, mask, weight, bias, stride=stride)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        inputs = [t.detach().requires_grad_(n) for t, n in zip(saved, needs)]
        grads: list[Tensor | None] = [None] * 4
        wanted = [i for i, n in enumerate(needs) if n]
        if wanted:
            with torch.enable_grad():
                out = deform_conv3x3_by_sampling(*inputs, None, stride=ctx.stride)
            computed = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out)
            for i, g in zip(wanted, computed):
                grads[i] = g
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_out.sum(dim=(0, 2, 3))
        return (*grads, grad_bias, None)


class ModulatedDeformConv3x3(nn.Module):
    """Holds the weight and bias of a modulated deformable 3x3 convolution (padding 1).

    Initialised like the original ``ModulatedDeformConv``: weight uniform(+-1/sqrt(9 C_in)),
    bias zero.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        """
        Args:
            in_channels: input channels.
            out_channels: output channels.
            stride: convolution stride.
        """
        super().__init__()
        self.stride = stride
        # see modulated_deform_conv3x3; DyHead sets it from MODEL.DYHEAD.DFCONV_RECOMPUTE
        self.recompute = True
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_channels))
        bound = 1.0 / math.sqrt(in_channels * _KERNEL_TAPS)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """
        Args:
            x: shape (B, C_in, H, W).
            offset: shape (B, 18, H_o, W_o), see :func:`modulated_deform_conv3x3`.
            mask: shape (B, 9, H_o, W_o).

        Returns:
            Tensor of shape (B, C_out, (H - 1) // stride + 1, (W - 1) // stride + 1), fp32.
        """
        return modulated_deform_conv3x3(
            x, offset, mask, self.weight, self.bias, self.stride, recompute=self.recompute
        )


class Conv3x3Norm(nn.Module):
    """A 3x3 convolution (deformable or plain, with bias) followed by GroupNorm."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, num_groups: int, deformable: bool
    ):
        """
        Args:
            in_channels: input channels.
            out_channels: output channels.
            stride: convolution stride.
            num_groups: GroupNorm groups.
            deformable: use a modulated deformable conv (else ``nn.Conv2d`` with N(0, 0.01) init).
        """
        super().__init__()
        self.deformable = deformable
        if deformable:
            self.conv = ModulatedDeformConv3x3(in_channels, out_channels, stride)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
            nn.init.normal_(self.conv.weight, std=0.01)
            nn.init.zeros_(self.conv.bias)
        self.bn = nn.GroupNorm(num_groups, out_channels)

    def forward(
        self, x: Tensor, offset: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """
        Args:
            x: shape (B, C_in, H, W).
            offset: shape (B, 18, H_o, W_o); required when deformable.
            mask: shape (B, 9, H_o, W_o); required when deformable.

        Returns:
            Tensor of shape (B, C_out, (H - 1) // stride + 1, (W - 1) // stride + 1).
        """
        if self.deformable:
            return self.bn(self.conv(x, offset, mask))
        return self.bn(self.conv(x))


class DyReLU(nn.Module):
    """Dynamic ReLU with two per-channel linear pieces: ``max(a1 x + b1, a2 x + b2)``.

    The coefficients come from a squeeze-excite MLP on the global average of the input; its
    output is split in the order (a1, b1, a2, b2), with a1 centred at 1 and a2, b1, b2 at 0.
    """

    def __init__(self, channels: int, reduction: int = 4):
        """
        Args:
            channels: input and output channels.
            reduction: squeeze ratio of the MLP.
        """
        super().__init__()
        self.channels = channels
        squeeze = channels // reduction
        self.fc = nn.Sequential(
            nn.Linear(channels, squeeze),
            nn.ReLU(inplace=True),
            nn.Linear(squeeze, 4 * channels),
            nn.Hardsigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: shape (B, C, H, W).

        Returns:
            Tensor of shape (B, C, H, W).
        """
        y = self.fc(x.mean(dim=(2, 3)))[:, :, None, None]
        a1, b1, a2, b2 = torch.split(y, self.channels, dim=1)
        a1 = 2.0 * (a1 - 0.5) + 1.0
        a2 = 2.0 * (a2 - 0.5)
        return torch.maximum(x * a1 + b1 - 0.5, x * a2 + b2 - 0.5)


class DyConv(nn.Module):
    """One DyHead block over all pyramid levels.

    For level l: ``DyConv.1`` runs on level l, ``DyConv.2`` (stride 2) on the finer level l-1,
    ``DyConv.0`` on the coarser level l+1 followed by a bilinear upsample (align_corners=True);
    all three share the offsets/mask predicted by ``offset`` from level l. The results are
    weighted by the scale attention ``hardsigmoid(relu(AttnConv(f)))`` (in [0.5, 1]), averaged,
    and passed through DyReLU (or ReLU).
    """

    def __init__(
        self,
        channels: int = 256,
        num_groups: int = 16,
        use_dyrelu: bool = True,
        use_dfconv: bool = True,
    ):
        """
        Args:
            channels: width of every level.
            num_groups: GroupNorm groups.
            use_dyrelu: DyReLU activation (else ReLU).
            use_dfconv: modulated deformable convs (else plain 3x3 convs, no ``offset``).
        """
        super().__init__()
        self.use_dfconv = use_dfconv
        self.DyConv = nn.ModuleList(
            [
                Conv3x3Norm(channels, channels, 1, num_groups, use_dfconv),  # coarser level
                Conv3x3Norm(channels, channels, 1, num_groups, use_dfconv),  # same level
                Conv3x3Norm(channels, channels, 2, num_groups, use_dfconv),  # finer level
            ]
        )
        self.AttnConv = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, kernel_size=1), nn.ReLU(inplace=True)
        )
        nn.init.normal_(self.AttnConv[1].weight, std=0.01)
        nn.init.zeros_(self.AttnConv[1].bias)
        self.h_sigmoid = nn.Hardsigmoid()
        self.relu = DyReLU(channels) if use_dyrelu else nn.ReLU()
        # PyTorch's default conv init is kept for the offset/mask predictor.
        self.offset = (
            nn.Conv2d(channels, 3 * _KERNEL_TAPS, kernel_size=3, padding=1) if use_dfconv else None
        )

    def scale_attention(self, feature: Tensor) -> Tensor:
        """Scale-attention weight of one branch output.

        Args:
            feature: shape (B, C, H, W).

        Returns:
            Tensor of shape (B, 1, 1, 1) with values in [0.5, 1].
        """
        return self.h_sigmoid(self.AttnConv(feature))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """
        Args:
            features: pyramid levels, finest first, each of shape (B, C, H_l, W_l) with
                ``H_l = (H_{l-1} - 1) // 2 + 1`` (likewise W).

        Returns:
            list of Tensors of the same shapes.
        """
        outputs = []
        num_levels = len(features)
        for level, feature in enumerate(features):
            offset = mask = None
            if self.offset is not None:
                offset_mask = self.offset(feature)
                offset = offset_mask[:, : 2 * _KERNEL_TAPS]
                mask = offset_mask[:, 2 * _KERNEL_TAPS :].sigmoid()
            size = feature.shape[-2:]
            branches = [self.DyConv[1](feature, offset, mask)]
            if level > 0:
                finer = features[level - 1]
                finer_out = tuple(_conv_out_size(n, 2) for n in finer.shape[-2:])
                if finer_out != tuple(size):
                    raise ValueError(
                        f"level {level} has size {tuple(size)} but the stride-2 conv of level "
                        f"{level - 1} {tuple(finer.shape[-2:])} gives {finer_out}"
                    )
                branches.append(self.DyConv[2](finer, offset, mask))
            if level < num_levels - 1:
                coarser = self.DyConv[0](features[level + 1], offset, mask)
                branches.append(
                    F.interpolate(coarser, size=size, mode="bilinear", align_corners=True)
                )
            weighted = [self.scale_attention(b) * b for b in branches]
            outputs.append(self.relu(torch.stack(weighted).mean(dim=0)))
        return outputs


class DyHead(nn.ModuleList):
    """The DyHead tower: ``num_convs`` :class:`DyConv` blocks applied in sequence.

    Children are named ``0 .. num_convs-1`` so state-dict keys read
    ``{t}.DyConv.{k}.conv.weight`` as in released weights.
    """

    @configurable
    def __init__(
        self,
        *,
        channels: int = 256,
        num_convs: int = 6,
        num_groups: int = 16,
        use_dyrelu: bool = True,
        use_dfconv: bool = True,
        use_checkpoint: bool = False,
        recompute_dfconv: bool = True,
    ):
        """
        Args:
            channels: width of every pyramid level.
            num_convs: number of DyConv blocks.
            num_groups: GroupNorm groups.
            use_dyrelu: DyReLU activation (else ReLU).
            use_dfconv: modulated deformable convs (else plain 3x3 convs).
            use_checkpoint: recompute each block in the backward pass (activation checkpointing).
            recompute_dfconv: the CPU deformable convs keep only their inputs for the backward
                pass and sample again there (same gradients, far less memory); False keeps the
                samples (see :func:`modulated_deform_conv3x3`).
        """
        if channels % num_groups != 0:
            raise ValueError(f"channels {channels} not divisible by num_groups {num_groups}")
        super().__init__(
            [DyConv(channels, num_groups, use_dyrelu, use_dfconv) for _ in range(num_convs)]
        )
        self.channels = channels
        self.use_checkpoint = use_checkpoint
        for module in self.modules():
            if isinstance(module, ModulatedDeformConv3x3):
                module.recompute = recompute_dfconv

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Keyword arguments from ``cfg.MODEL.DYHEAD``."""
        return {
            "channels": cfg.MODEL.DYHEAD.CHANNELS,
            "num_convs": cfg.MODEL.DYHEAD.NUM_CONVS,
            "num_groups": cfg.MODEL.DYHEAD.NUM_GROUPS,
            "use_dyrelu": cfg.MODEL.DYHEAD.USE_DYRELU,
            "use_dfconv": cfg.MODEL.DYHEAD.USE_DFCONV,
            "use_checkpoint": cfg.MODEL.DYHEAD.USE_CHECKPOINT,
            "recompute_dfconv": cfg.MODEL.DYHEAD.DFCONV_RECOMPUTE,
        }

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """
        Args:
            features: pyramid levels P3.., each of shape (B, channels, H_l, W_l).

        Returns:
            list of Tensors of the same shapes.
        """
        if not features:
            raise ValueError("DyHead needs at least one feature level")
        for level, f in enumerate(features):
            if f.dim() != 4 or f.shape[1] != self.channels:
                raise ValueError(
                    f"level {level}: expected (B, {self.channels}, H, W), got {tuple(f.shape)}"
                )
        features = list(features)
        for block in self:
            if self.use_checkpoint and torch.is_grad_enabled():
                features = list(checkpoint(_run_block, block, *features, use_reentrant=False))
            else:
                features = block(features)
        return features


def _run_block(block: DyConv, *features: Tensor) -> tuple[Tensor, ...]:
    """Call a block on positional levels (the form ``torch.utils.checkpoint`` wants)."""
    return tuple(block(list(features)))
