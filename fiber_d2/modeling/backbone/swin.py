"""FIBER's image tower: timm's Swin Transformer with the original pad-then-shift windows and
FIBER's image-to-text cross-attention in the top blocks (fine-grained spec §1.1-1.3, coarse §1.4).

Three things differ from a stock timm ``SwinTransformer``:

* window attention pads the (normalised) map to a window multiple *before* the cyclic shift and
  builds the -100 region mask on the padded grid, as the original Swin / detectron2's ``swin.py``
  do (timm rolls first, which changes the numbers whenever a stage is not a window multiple);
* the top ``num_fusion_blocks`` blocks carry FIBER's image-side cross-attention to the text
  (``qkv_text_i2t``, ``qkv_i2t``, ``proj_i2t``, ``alpha_i2t``, optional ``norm_i2t_i``) on their
  ``attn`` module, added as ``SA + alpha * CA`` inside the residual branch;
* per-stage NCHW outputs ``res2..res5`` with per-output norms ``norm0..norm3`` replace timm's
  final norm and classifier head.

The blocks (pad-then-shift attention, fusion) are in :mod:`fiber_d2.modeling.backbone.swin_block`;
this module stacks them into the tower.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from .swin_block import FIBERSwinBlock, FusedWindowAttention, text_padding_bias

__all__ = [
    "FusedWindowAttention",
    "FIBERSwinBlock",
    "SwinImageTower",
    "fused_block_dims",
    "text_padding_bias",
]

logger = logging.getLogger(__name__)


def fused_block_dims(embed_dim: int, depths: Sequence[int], num_fusion_blocks: int) -> list[int]:
    """Channel width of each fused image block, in forward order.

    The fused blocks are the last ``num_fusion_blocks`` blocks of the tower; a block of stage ``s``
    works at ``embed_dim * 2**s`` channels (FIBER-B: ``[512] * 4 + [1024] * 2``).

    Args:
        embed_dim: stage-1 width.
        depths: blocks per stage.
        num_fusion_blocks: number of fused blocks counted from the top.

    Returns:
        one width per fused block.
    """
    dims = [embed_dim * 2**s for s, depth in enumerate(depths) for _ in range(depth)]
    if not 0 <= num_fusion_blocks <= len(dims):
        raise ValueError(
            f"num_fusion_blocks={num_fusion_blocks} must lie in [0, {len(dims)}] "
            f"(the tower has {len(dims)} blocks)"
        )
    return dims[len(dims) - num_fusion_blocks :]


class SwinImageTower(SwinTransformer):
    """FIBER's Swin image tower on timm's ``SwinTransformer``.

    Blocks are numbered globally in forward order (FIBER-B: 0..23); the last
    ``num_fusion_blocks`` carry cross-attention. Stage ``s`` produces ``res{s+2}`` (stride
    ``4 * 2**s``) through ``norm{s}``. Parameter names follow timm (patch merging at the start of
    the next stage: ``layers.{s+1}.downsample``).
    """

    @configurable
    def __init__(
        self,
        *,
        patch_size: int = 4,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.4,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        out_norm: Sequence[bool] = (False, True, True, True),
        freeze_at: int = -1,
        use_checkpoint: bool = False,
        num_fusion_blocks: int = 0,
        text_dim: int = 768,
        i2t_query_norm: bool = False,
        shift_single_window: bool = True,
        fused_attention: bool = True,
        weights: str = "",
    ):
        """
        Args:
            patch_size: patch-embedding stride.
            embed_dim: stage-1 width.
            depths: blocks per stage.
            num_heads: heads per stage.
            window_size: attention window side.
            mlp_ratio: MLP hidden width / block width.
            drop_path_rate: stochastic depth of the last block, linear from 0 over all blocks.
            out_features: which of ``res2..res{n+1}`` to return.
            out_norm: per stage, LayerNorm on its output (else Identity).
            freeze_at: -1 freezes nothing; 0 the patch embedding; k >= 1 the patch embedding and
                the first k stages, each with the patch merging that ends it in the original.
            use_checkpoint: activation checkpointing of the blocks of every stage but the last.
            num_fusion_blocks: number of top blocks with image-to-text cross-attention.
            text_dim: text hidden width seen by the cross-attention.
            i2t_query_norm: ``norm_i2t_i`` on the cross-attention query (fine v3, coarse).
            shift_single_window: see :class:`FIBERSwinBlock`.
            fused_attention: in inference (eval mode, no gradient recorded), window
                self-attention through ``scaled_dot_product_attention`` (timm's ``fused_attn``)
                instead of matmul + softmax: same outputs to ~1e-6, less time and memory.
                Training-mode forwards keep matmul + softmax: with the bias table requiring a
                gradient, torch falls back to its reference kernel, slower than timm's path on
                the CPU, and the arithmetic of training stays the original's.
            weights: a local Swin ImageNet checkpoint (original Microsoft or timm layout) loaded
                after the initialisation (:meth:`load_imagenet_checkpoint`); "" keeps the init.
                A later ``MODEL.WEIGHTS`` load overrides what it sets.
        """
        num_stages = len(depths)
        if len(num_heads) != num_stages or len(out_norm) != num_stages:
            raise ValueError(
                f"depths {tuple(depths)}, num_heads {tuple(num_heads)} and out_norm "
                f"{tuple(out_norm)} must have one entry per stage"
            )
        names = [f"res{s + 2}" for s in range(num_stages)]
        for name in out_features:
            if name not in names:
                raise KeyError(f"unknown Swin output {name!r}; expected one of {names}")
        super().__init__(
            patch_size=patch_size,
            in_chans=3,
            num_classes=0,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            always_partition=True,
            strict_img_size=False,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            weight_init="skip",  # initialised once below, after the blocks are replaced
        )
        self.head = nn.Identity()
        self.norm = nn.Identity()  # timm's final norm; FIBER uses per-output norms instead
        self.patch_size = patch_size
        self.depths = tuple(depths)
        self.use_checkpoint = use_checkpoint
        self.freeze_at = freeze_at
        self._out_features = list(out_features)

        total = sum(depths)
        first_fused = total - num_fusion_blocks
        fused_block_dims(embed_dim, depths, num_fusion_blocks)  # validates the count
        rates = torch.linspace(0, drop_path_rate, total, device="cpu").tolist()
        self._block_index: list[tuple[int, int]] = []
        for s, depth in enumerate(depths):
            blocks = []
            for b in range(depth):
                g = len(self._block_index)
                self._block_index.append((s, b))
                blocks.append(
                    FIBERSwinBlock(
                        dim=embed_dim * 2**s,
                        num_heads=num_heads[s],
                        window_size=window_size,
                        shift_size=0 if b % 2 == 0 else window_size // 2,
                        mlp_ratio=mlp_ratio,
                        drop_path=rates[g],
                        text_dim=text_dim if g >= first_fused else None,
                        query_norm=i2t_query_norm,
                        shift_single_window=shift_single_window,
                        fused_attention=fused_attention,
                    )
                )
            self.layers[s].blocks = nn.Sequential(*blocks)
        for s in range(num_stages):
            use_norm = out_norm[s] and names[s] in out_features
            self.add_module(
                f"norm{s}", nn.LayerNorm(embed_dim * 2**s) if use_norm else nn.Identity()
            )
        self.fused_block_ids = list(range(first_fused, total))
        self.fused_block_dims = fused_block_dims(embed_dim, depths, num_fusion_blocks)
        self._out_channels = {names[s]: embed_dim * 2**s for s in range(num_stages)}
        self._out_strides = {names[s]: patch_size * 2**s for s in range(num_stages)}

        # timm's default Swin init (trunc-normal 0.02 Linear weights, zero biases), fusion included.
        self.weight_init_mode = ""
        self.init_weights(needs_reset=False)
        if weights:
            self.load_imagenet_checkpoint(weights)
        self._freeze()
        self.train(self.training)

    @classmethod
    def from_config(cls, cfg) -> dict:
        swin = cfg.MODEL.SWIN
        return {
            "patch_size": swin.PATCH_SIZE,
            "embed_dim": swin.EMBED_DIM,
            "depths": tuple(swin.DEPTHS),
            "num_heads": tuple(swin.NUM_HEADS),
            "window_size": swin.WINDOW_SIZE,
            "mlp_ratio": swin.MLP_RATIO,
            "drop_path_rate": swin.DROP_PATH_RATE,
            "out_features": tuple(swin.OUT_FEATURES),
            "out_norm": tuple(swin.OUT_NORM),
            "freeze_at": swin.FREEZE_AT,
            "use_checkpoint": swin.USE_CHECKPOINT,
            "num_fusion_blocks": cfg.MODEL.FIBER.NUM_FUSION_LAYERS,
            "text_dim": cfg.MODEL.LANGUAGE_BACKBONE.HIDDEN_SIZE,
            "i2t_query_norm": cfg.MODEL.FIBER.I2T_QUERY_NORM,
            "shift_single_window": swin.SHIFT_SINGLE_WINDOW,
            "fused_attention": swin.FUSED_ATTENTION,
            "weights": swin.WEIGHTS,
        }

    # ------------------------------------------------------------------ structure
    @property
    def num_blocks(self) -> int:
        """Total number of blocks."""
        return len(self._block_index)

    @property
    def size_divisibility(self) -> int:
        """Input sides must be multiples of this (patch size x 2 per patch merging)."""
        return self.patch_size * 2 ** (len(self.depths) - 1)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of every returned output."""
        return {
            name: ShapeSpec(channels=self._out_channels[name], stride=self._out_strides[name])
            for name in self._out_features
        }

    def block_position(self, g: int) -> tuple[int, int]:
        """(stage, block within the stage) of the block with global index ``g``."""
        return self._block_index[g]

    def block(self, g: int) -> FIBERSwinBlock:
        """The block with global index ``g``."""
        s, b = self._block_index[g]
        return self.layers[s].blocks[b]

    def _frozen_modules(self) -> list[nn.Module]:
        if self.freeze_at < 0:
            return []
        modules: list[nn.Module] = [self.patch_embed]
        for s in range(min(self.freeze_at, len(self.layers))):
            modules.append(self.layers[s])
            if s + 1 < len(self.layers):
                # the original ends stage s with the patch merging timm puts at the start of s+1
                modules.append(self.layers[s + 1].downsample)
        return modules

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        if self.freeze_at >= 0:
            logger.info("Swin tower: froze patch embedding and %d stage(s)", max(self.freeze_at, 0))

    def train(self, mode: bool = True) -> SwinImageTower:
        """Set the mode; frozen stages stay in eval mode (no stochastic depth), as in the original."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    # ------------------------------------------------------------------ forward pieces
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding (+ LayerNorm).

        Args:
            images: (B, 3, H, W) with H, W multiples of :attr:`size_divisibility`.

        Returns:
            (B, H/p, W/p, C0) tokens, channels last.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        div = self.size_divisibility
        if height < self.patch_size or width < self.patch_size or height % div or width % div:
            raise ValueError(
                f"image size {height}x{width} is not supported: both sides must be positive multiples "
                f"of {div} (patch {self.patch_size}, then an even map for every patch merging); pad the "
                f"images to a multiple of {div} (the detector does: ImageList.from_tensors)"
            )
        return self.patch_embed(images)

    def enter_block(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Map (B, H, W, C) tokens to the (B, H', W', C') input of block ``g``: applies the patch
        merging in front of the first block of stages >= 2, else returns ``x``."""
        s, b = self._block_index[g]
        if b == 0 and s > 0:
            x = self.layers[s].downsample(x)
        return x

    def run_block(
        self,
        x: torch.Tensor,
        g: int,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run block ``g`` (with activation checkpointing when enabled for its stage).

        Args:
            x: (B, H, W, C) block input.
            g: global block index.
            text: (B, T, D) text states for a fused block, else None.
            text_mask: (B, T) text attention mask.

        Returns:
            (B, H, W, C) block output.
        """
        s, _ = self._block_index[g]
        blk = self.block(g)
        if self.use_checkpoint and s < len(self.depths) - 1 and torch.is_grad_enabled():
            # the text goes in as an explicit input so the recomputation sees the same tensors
            return checkpoint(blk, x, text, text_mask, use_reentrant=False)
        return blk(x, text, text_mask)

    def exit_block(
        self, x: torch.Tensor, g: int, outputs: dict[str, torch.Tensor], apply_norm: bool = True
    ) -> None:
        """Store the stage output if block ``g`` ends a stage.

        Args:
            x: (B, H, W, C) output of block ``g``.
            g: global block index.
            outputs: dict receiving ``res{s+2}``: (B, C, H, W) after ``norm{s}``.
            apply_norm: False skips the output norm (used for the last output of a fused pass
                when FUSED_LAST_IMAGE_NORM is off).
        """
        s, b = self._block_index[g]
        name = f"res{s + 2}"
        if b == self.depths[s] - 1 and name in self._out_features:
            y = getattr(self, f"norm{s}")(x) if apply_norm else x
            outputs[name] = y.permute(0, 3, 1, 2).contiguous()

    def run_blocks(
        self, x: torch.Tensor, start: int, stop: int, outputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Run the unimodal blocks ``start <= g < stop`` (patch merging and outputs included).

        Args:
            x: (B, H, W, C) input of block ``start`` before its patch merging.
            start: first global block index.
            stop: one past the last global block index.
            outputs: dict receiving the stage outputs produced on the way.

        Returns:
            (B, H', W', C') output of block ``stop - 1``.
        """
        for g in range(start, stop):
            x = self.enter_block(x, g)
            x = self.run_block(x, g)
            self.exit_block(x, g, outputs)
        return x

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unimodal forward (no fusion, every output norm).

        Args:
            images: (B, 3, H, W).

        Returns:
            {"res2".."res5"}: (B, C_s, H / 2**(s+2), W / 2**(s+2)) per requested output.
        """
        outputs: dict[str, torch.Tensor] = {}
        self.run_blocks(self.embed(images), 0, self.num_blocks, outputs)
        return outputs

    # ------------------------------------------------------------------ weights
    def load_imagenet_checkpoint(self, path: str) -> tuple[list[str], list[str]]:
        """Load an original (Microsoft) or timm Swin ImageNet checkpoint from a local file.

        timm's ``checkpoint_filter_fn`` moves the patch merging to timm's place and resizes the
        relative-position tables when the window differs. The classifier head is dropped; the
        final ``norm`` (the norm of the last stage's output) goes to the last output norm when that
        is a LayerNorm. Fusion modules are absent from such checkpoints and keep their init.

        Args:
            path: local file (``{"model": state_dict}`` or a plain state dict), read safely.

        Returns:
            (missing_keys, unexpected_keys) of the non-strict load: only fusion modules and output
            norms can be missing, and nothing can be unexpected.

        Raises:
            CheckpointError: unreadable file, or one that does not fit this tower (one line naming
                the file and the first offending keys).
        """
        from ...checkpoint.safe_io import CheckpointError, load_checkpoint_file

        state = load_checkpoint_file(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"MODEL.SWIN.WEIGHTS {path}: not a state dict")
        try:
            state = checkpoint_filter_fn(state, self)
        except (AttributeError, KeyError, IndexError, RuntimeError, ValueError) as e:
            # timm's remapping walks this tower's modules by the file's keys: another depth or
            # stage count fails there (e.g. "Sequential has no attribute '4'")
            reason = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(
                f"MODEL.SWIN.WEIGHTS {path} does not fit the tower (MODEL.SWIN sizes: DEPTHS "
                f"{list(self.depths)}): {reason}"
            ) from None
        last = len(self.depths) - 1
        last_norm = getattr(self, f"norm{last}")
        converted = {}
        for key, value in state.items():
            if key.startswith("head."):
                continue
            if key.startswith("norm."):
                if not isinstance(last_norm, nn.LayerNorm):
                    continue
                key = f"norm{last}." + key[len("norm.") :]
            converted[key] = value
        try:
            missing, unexpected = self.load_state_dict(converted, strict=False)
        except RuntimeError as e:  # shape mismatches
            reason = str(e).strip().splitlines()[-1].strip()
            raise CheckpointError(
                f"MODEL.SWIN.WEIGHTS {path} does not fit the tower: {reason}"
            ) from None
        unfilled = [k for k in missing if "_i2t" not in k and not k.startswith("norm")]
        if unexpected or unfilled:
            raise CheckpointError(
                f"MODEL.SWIN.WEIGHTS {path} does not fit the tower (MODEL.SWIN sizes): "
                f"unexpected keys {unexpected[:3]}, missing keys {unfilled[:3]}"
            )
        logger.info(
            "Swin weights %s: loaded; %d fusion / output-norm keys keep their init",
            path,
            len(missing),
        )
        return list(missing), list(unexpected)

    def imagenet_state_dict(self) -> dict[str, torch.Tensor]:
        """The tower's weights in the original (Microsoft) Swin ImageNet layout, the one
        :meth:`load_imagenet_checkpoint` and ``MODEL.SWIN.WEIGHTS`` read: patch merging at the end
        of its stage (``layers.{s}.downsample``), the last output norm as ``norm`` when it is a
        LayerNorm, no fusion modules, no other output norms, no buffers.

        Returns:
            name -> tensor (detached, shared with the module).
        """
        last = len(self.depths) - 1
        out = {}
        for key, value in self.state_dict().items():
            if "_i2t" in key or "relative_position_index" in key or "attn_mask" in key:
                continue
            if key.startswith("norm"):
                if key.startswith(f"norm{last}."):
                    out["norm." + key[len(f"norm{last}.") :]] = value
                continue
            parts = key.split(".")
            if parts[0] == "layers" and parts[2] == "downsample":
                parts[1] = str(int(parts[1]) - 1)
                key = ".".join(parts)
            out[key] = value
        return out
