"""A block of FIBER's Swin image tower (fine-grained spec §1.1-1.3, coarse §1.4).

:class:`FIBERSwinBlock` is timm's ``SwinTransformerBlock`` with the original pad-then-shift window
attention and, in the top blocks, :class:`FusedWindowAttention`: timm's window attention plus
FIBER's image-to-text cross-attention. The tower that stacks them is
:class:`~fiber_d2.modeling.backbone.swin.SwinImageTower`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import nn

__all__ = ["FIBERSwinBlock", "FusedWindowAttention", "text_padding_bias"]


def text_padding_bias(text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias that masks out padded text tokens.

    The original builds it with HF's ``get_extended_attention_mask``; whether the released models
    used -10000 or the dtype minimum is UNDETERMINED (spec §1.3). We choose the dtype minimum (what
    transformers 5 uses): both mask pads out completely, and the minimum keeps the bias finite in
    fp16 too.

    Args:
        text_mask: (B, T) 1/True for real tokens, 0/False for padding.
        dtype: dtype of the attention scores.

    Returns:
        (B, 1, 1, T) bias: 0 for real tokens, ``finfo(dtype).min`` for padding.
    """
    keep = text_mask.to(torch.bool)[:, None, None, :]
    bias = torch.zeros(keep.shape, dtype=dtype, device=text_mask.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)


class FusedWindowAttention(WindowAttention):
    """timm window attention plus FIBER's image-to-text cross-attention parameters.

    Self-attention is timm's, unchanged. :meth:`cross_attend` is FIBER's image-side
    cross-attention: queries from the self-attention output (after ``proj``), keys/values from the
    text hidden states through one joint ``qkv_text_i2t`` projection, all text tokens visible
    except padding. It is independent per image token, so it runs on the whole (un-windowed) token
    sequence; this equals the original per-window computation (coarse spec §1.4).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int,
        text_dim: int,
        query_norm: bool = False,
        qkv_bias: bool = True,
    ):
        """
        Args:
            dim: image channel width C.
            num_heads: attention heads (self- and cross-attention).
            window_size: attention window side.
            text_dim: width of the text hidden states (768 for RoBERTa-base).
            query_norm: add ``norm_i2t_i`` (LayerNorm over C) on the query input (fine v3, coarse).
            qkv_bias: bias of the self-attention ``qkv`` projection.
        """
        super().__init__(dim, num_heads, window_size=window_size, qkv_bias=qkv_bias)
        self.qkv_text_i2t = nn.Linear(text_dim, 2 * dim)  # text -> [K; V]
        self.qkv_i2t = nn.Linear(dim, dim)  # query (the original name, although it makes only q)
        self.proj_i2t = nn.Linear(dim, dim)
        self.alpha_i2t = nn.Parameter(torch.zeros(1))  # gate, initialised to exactly 0
        self.norm_i2t_i = nn.LayerNorm(dim) if query_norm else None

    def cross_attend(
        self, a: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Image-to-text cross-attention (without the gate).

        Args:
            a: (B, N, C) self-attention output after ``proj``.
            text: (B, T, D) text hidden states (the paired text layer's input).
            text_mask: (B, T) 1 for real tokens, 0 for padding.

        Returns:
            (B, N, C) cross-attention output after ``proj_i2t``.
        """
        batch, num_tokens, dim = a.shape
        heads = self.num_heads
        query_in = self.norm_i2t_i(a) if self.norm_i2t_i is not None else a
        q = self.qkv_i2t(query_in).view(batch, num_tokens, heads, dim // heads).transpose(1, 2)
        kv = self.qkv_text_i2t(text).view(batch, text.shape[1], 2, heads, dim // heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = text_padding_bias(text_mask, q.dtype)
        # default scale = head_dim ** -0.5, as in the original; attention dropout is 0 there.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj_i2t(out.transpose(1, 2).reshape(batch, num_tokens, dim))


class FIBERSwinBlock(SwinTransformerBlock):
    """timm Swin block with the original pad-then-shift window attention and optional fusion.

    Attention step: pad the normalised map to a window multiple, roll, mask cross-region pairs
    with -100 on the padded grid, partition, attend, reverse, roll back, crop. Fused blocks add
    ``alpha_i2t * CA(SA_out)`` to the self-attention output inside the residual branch, so one
    DropPath sample covers both terms.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        text_dim: int | None = None,
        query_norm: bool = False,
        shift_single_window: bool = True,
        fused_attention: bool = False,
    ):
        """
        Args:
            dim: channel width C.
            num_heads: attention heads.
            window_size: window side.
            shift_size: cyclic shift (0 for even blocks, window // 2 for odd ones).
            mlp_ratio: MLP hidden width / C.
            drop_path: stochastic-depth rate of this block.
            text_dim: text width if this block cross-attends to the text, else None.
            query_norm: LayerNorm on the cross-attention query input (``norm_i2t_i``).
            shift_single_window: shift even when the map fits in one window (detection Swin).
                False reproduces the classification Swin of the coarse stage, which does not
                shift a map that is no larger than the window.
            fused_attention: in eval mode without gradients, window self-attention through
                ``scaled_dot_product_attention`` (timm's ``fused_attn``); see
                :class:`~fiber_d2.modeling.backbone.swin.SwinImageTower`.
        """
        super().__init__(
            dim=dim,
            input_resolution=(window_size, window_size),  # unused: masks are built per forward
            num_heads=num_heads,
            window_size=window_size,
            shift_size=shift_size,
            always_partition=True,
            dynamic_mask=True,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path=drop_path,
        )
        self.shift_single_window = shift_single_window
        self.fused_attention = fused_attention
        self.is_fused = text_dim is not None
        if self.is_fused:
            self.attn = FusedWindowAttention(
                dim, num_heads, window_size=window_size, text_dim=text_dim, query_norm=query_norm
            )

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """Pad-then-shift window self-attention.

        Args:
            x: (B, H, W, C) normalised input.

        Returns:
            (B, H, W, C) self-attention output (after ``proj``).
        """
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
        padded_h, padded_w = x.shape[1], x.shape[2]
        shift = self.shift_size
        if not self.shift_single_window and height <= win_h and width <= win_w:
            shift = (0, 0)
        has_shift = any(shift)
        if has_shift:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            # timm's region mask, built on the padded and rolled grid as in the original.
            mask = self.get_attn_mask(x)
        else:
            mask = None
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        # Eval mode without gradients only: any training-mode forward (also one under no_grad inside
        # a training step) keeps the original's arithmetic, so training is unchanged bit for bit.
        inference = not (self.training or torch.is_grad_enabled())
        self.attn.fused_attn = self.fused_attention and inference
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if has_shift:
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width, :]

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, H, W, C) block input.
            text: (B, T, D) text hidden states, or None for the unimodal block.
            text_mask: (B, T) text attention mask (1 = real token); needed with ``text``.

        Returns:
            (B, H, W, C) block output.
        """
        batch, height, width, channels = x.shape
        a = self._attn(self.norm1(x))
        if text is not None and self.is_fused:
            if text_mask is None:
                raise ValueError("FIBERSwinBlock: text given without its attention mask")
            flat = a.reshape(batch, height * width, channels)
            cross = self.attn.cross_attend(flat, text, text_mask)
            a = a + (self.attn.alpha_i2t * cross).view(batch, height, width, channels)
        x = x + self.drop_path1(a)
        x = x.reshape(batch, -1, channels)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(batch, height, width, channels)
