"""``FIBERFusedTask``: the base of the downstream models that read the fused ``cls_feats`` (VQA, NLVR2)
and of the caption model (``projects/Captioning``).

Coarse spec §1.7 / §2: the fused forward ends in ``cls_feats`` = [text pooled ; image pooled] (2D wide).
A task model is :class:`FIBERCoarse` without the pre-training heads and queue (``mlm_score``,
``itm_score``, ``temp``, the ITC queue), plus its own head. It keeps the ITC transforms and poolers, as
the original's task models do, so a coarse checkpoint (converted or trained here) loads with only the
pre-training heads unused, and a released task checkpoint loads with nothing missing or unexpected.

With ``feature_cache`` (a frozen, deterministic fused backbone, as the Demo's VQA / NLVR2 stages train
it) the backbone's part of each (image, text) input is kept in memory and computed only the first time
the input is seen: :meth:`FIBERFusedTask.cls_feats_of`. With ``image_prefix_cache`` as well, so is the
image tower's prefix (the blocks below the first fused one) of each image, which does not depend on the
text: a new (image, text) input with an image seen before runs only the text prefix and the fused top.

Also here: :func:`task_head`, the original's head shape (Linear, LayerNorm, GELU, Linear; keys
``{0,1,3}.*``); :func:`init_head` (from fiber_coarse) is re-exported.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

from ...config import ConfigError
from ..backbone.fused import FusionPrefix
from .coarse_heads import init_head
from .fiber_coarse import FIBERCoarse

__all__ = ["FIBERFusedTask", "task_head", "init_head"]

logger = logging.getLogger(__name__)


def task_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear(in, hidden), LayerNorm(hidden), GELU, Linear(hidden, out): the VQA / NLVR2 head."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim)
    )


class FIBERFusedTask(FIBERCoarse):
    """:class:`FIBERCoarse` without pre-training heads; subclasses add a head and ``forward``.

    Constructed with the arguments of :class:`FIBERCoarse` (its ``losses`` are ignored). Subclasses
    name their head's parameter prefixes in ``STAGE_HEADS``: a checkpoint without them (a coarse
    pre-training checkpoint) still counts as a complete load for the strict-weights check. A subclass
    that builds its own heads instead of the pre-training ones (captioning) overrides
    :meth:`FIBERCoarse._build_heads` and empties ``_PRETRAIN_ONLY``.
    """

    STAGE_HEADS: tuple[str, ...] = ()
    # what the feature cache stands in for (a submodule path) and the config that freezes it
    CACHED_MODULE = "backbone"
    CACHED_FREEZE = "MODEL.SWIN.FREEZE_AT 4 and MODEL.LANGUAGE_BACKBONE.FREEZE True"
    # built by FIBERCoarse._build_heads, then dropped (building them keeps the init draws of the
    # task models as they were)
    _PRETRAIN_ONLY: tuple[str, ...] = ("mlm_score", "itm_score", "queue", "temp")

    def __init__(
        self,
        *,
        cls_batch_norm: bool = False,
        feature_cache: bool = False,
        image_prefix_cache: bool = False,
        cache_max_mb: int = 2048,
        **kwargs,
    ):
        """
        Args:
            cls_batch_norm: standardise each ``cls_feats`` dimension over the batch (running
                statistics at inference; no parameters) before the task head. A switch for
                from-scratch towers (MODEL.COARSE.CLS_BATCH_NORM, ``configs/Demo/`` task configs
                only): their ``<s>`` state varies across texts by about 1e-3 of its size, and the
                pooled image by about a tenth, so the head sees nearly the same input for every
                example and learns only the answer prior (README, "Vision-language tasks"). Off
                (the original) for converted or pre-trained weights.
            feature_cache: keep what :attr:`CACHED_MODULE` gives each input and reuse it when the
                same input comes again (MODEL.COARSE.FEATURE_CACHE). Here: the fused backbone's
                ``<s>`` state and mean last-stage image token of each (image, text) input
                (:meth:`cls_feats_of`). Needs that module without trainable parameters or dropout
                (ValueError otherwise), so that it is a function of its input; the transforms,
                poolers and head still run every step.
                The outputs equal the uncached ones up to rounding (the image transform is applied
                to the token mean instead of averaged over the tokens, a linear map either way).
            image_prefix_cache: with ``feature_cache``, also keep each distinct image's prefix
                (MODEL.COARSE.IMAGE_PREFIX_CACHE): the (S/16)^2 x C3 input of the first fused block
                (Swin's third stage), 32 KB per image for the Demo at 128 px, about 2.6 MB for
                FIBER-B at 576 px. Only :meth:`cls_feats_of` reads it.
            cache_max_mb: the memory both caches may hold together, on the model's device
                (MODEL.COARSE.FEATURE_CACHE_MAX_MB). Once full they stop growing (a warning says so
                once) and inputs not cached yet run the backbone every time they come.
            kwargs: the arguments of :class:`FIBERCoarse` (its ``losses`` are ignored).
        """
        kwargs["losses"], kwargs["loss_weights"] = [], {}
        super().__init__(**kwargs)
        for name in self._PRETRAIN_ONLY:
            delattr(self, name)
        # the ITC batch norms (a from-scratch Demo switch, MODEL.COARSE.ITC_BATCH_NORM) serve ITC only
        self.itc_image_bn = self.itc_text_bn = None
        self.text_dim = self.cross_modal_text_transform.out_features
        # eps far below the text half's variance across texts (about 1e-7 for the Demo's towers)
        self.cls_bn = (
            nn.BatchNorm1d(2 * self.text_dim, eps=1e-9, affine=False) if cls_batch_norm else None
        )
        # content digest of (image, input_ids, attention_mask) -> [fused <s> state ; mean image token]
        self.feature_cache: dict[bytes, torch.Tensor] | None = None
        if feature_cache:
            self._check_cacheable()
            self.feature_cache = {}
        # content digest of an image -> its prefix (H', W', C), the input of the first fused block
        self.image_prefix_cache: dict[bytes, torch.Tensor] | None = None
        if image_prefix_cache:
            if not feature_cache:
                raise ConfigError(
                    "MODEL.COARSE.IMAGE_PREFIX_CACHE needs MODEL.COARSE.FEATURE_CACHE True"
                )
            if not self.backbone.schedule:
                raise ConfigError(
                    "MODEL.COARSE.IMAGE_PREFIX_CACHE needs fusion layers "
                    "(MODEL.FIBER.NUM_FUSION_LAYERS > 0)"
                )
            self.image_prefix_cache = {}
        if cache_max_mb <= 0:
            raise ConfigError(f"MODEL.COARSE.FEATURE_CACHE_MAX_MB must be > 0, got {cache_max_mb}")
        self.cache_max_bytes = int(cache_max_mb * 2**20)
        self.cache_bytes = 0  # held by both caches
        self._cache_full_warned = False
        # new weights make every cached output stale (as the detector's text-prefix cache)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.clear_feature_cache())

    def clear_feature_cache(self) -> None:
        """Forget every cached backbone output and image prefix."""
        for cache in (self.feature_cache, self.image_prefix_cache):
            if cache is not None:
                cache.clear()
        self.cache_bytes = 0
        self._cache_full_warned = False

    def heads_not_read(self) -> tuple[str, ...]:
        """None: the pre-training heads are dropped, and a head a subclass builds is read."""
        return ()

    def _check_cacheable(self) -> None:
        """The cache holds outputs of :attr:`CACHED_MODULE`: it must be a function of its input."""
        name, module = self.CACHED_MODULE, self.get_submodule(self.CACHED_MODULE)
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        if trainable:
            raise ConfigError(
                f"MODEL.COARSE.FEATURE_CACHE needs a frozen {name} ({self.CACHED_FREEZE}); "
                f"{len(trainable)} of its parameters train, e.g. {name}.{trainable[0]}"
            )
        dropout = [n for n, m in module.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
        if dropout:
            raise ConfigError(
                f"MODEL.COARSE.FEATURE_CACHE needs a {name} without dropout "
                "(MODEL.LANGUAGE_BACKBONE.HIDDEN_DROPOUT / ATTENTION_DROPOUT 0); "
                f"dropout at {name}.{dropout[0]}"
            )

    def _cached(
        self, digests: list[bytes], compute, cache: dict[bytes, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Entries (B, ...) of ``cache`` (default: the feature cache) for ``digests`` (see
        :meth:`_digest`); ``compute(rows)`` gives the entries of the inputs at those rows (the first
        row of each digest not cached yet); it runs once per call, without gradient."""
        cache = self.feature_cache if cache is None else cache
        new = {d: i for i, d in reversed(list(enumerate(digests))) if d not in cache}
        uncached = {}  # entries computed but left out of a full cache
        if new:
            rows = sorted(new.values())
            with torch.no_grad():
                entries = compute(rows)
            for i, entry in zip(rows, entries):
                size = entry.numel() * entry.element_size()
                if self.cache_bytes + size <= self.cache_max_bytes:
                    cache[digests[i]] = entry.clone()
                    self.cache_bytes += size
                    continue
                uncached[digests[i]] = entry
                if not self._cache_full_warned:
                    self._cache_full_warned = True
                    logger.warning(
                        "the feature caches are full (%.0f MB, MODEL.COARSE.FEATURE_CACHE_MAX_MB): "
                        "inputs not cached yet run the backbone every time",
                        self.cache_bytes / 2**20,
                    )
        return torch.stack([uncached[d] if d in uncached else cache[d] for d in digests])

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["cls_batch_norm"] = cfg.MODEL.COARSE.CLS_BATCH_NORM
        ret["feature_cache"] = cfg.MODEL.COARSE.FEATURE_CACHE
        ret["image_prefix_cache"] = cfg.MODEL.COARSE.IMAGE_PREFIX_CACHE
        ret["cache_max_mb"] = cfg.MODEL.COARSE.FEATURE_CACHE_MAX_MB
        return ret

    def images(self, batched_inputs: list[dict], key: str = "image") -> torch.Tensor:
        """Normalised (B, 3, S, S) float images from ``batched_inputs[i][key]`` (uint8, one size)."""
        return self._images([{"image": x[key]} for x in batched_inputs])

    def text(self, batched_inputs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ``input_ids`` and ``attention_mask`` stacked on the model's device."""
        ids = torch.stack([x["input_ids"] for x in batched_inputs]).to(self.device)
        mask = torch.stack([x["attention_mask"] for x in batched_inputs]).to(self.device)
        return ids, mask

    def cls_feats(self, images, input_ids, attention_mask) -> torch.Tensor:
        """Fused forward (coarse spec §1.7): (B, 3, S, S), (B, T), (B, T) -> (B, 2D), batch-standardised
        when ``cls_batch_norm`` is on."""
        feats = self.fused(images, input_ids, attention_mask)["cls_feats"]
        return feats if self.cls_bn is None else self.cls_bn(feats)

    def cls_feats_of(
        self, batched_inputs: list[dict], image_keys: tuple[str, ...] = ("image",)
    ) -> torch.Tensor:
        """``cls_feats`` (as :meth:`cls_feats`) of the records' (image, text) inputs: for each key in
        ``image_keys`` in turn, the image ``x[key]`` of every record with its text; (K * B, 2D).

        With the feature cache the backbone runs, without gradient, only for the inputs it has not
        seen (one batch of them); what is cached is reused in training and evaluation alike. With
        the image-prefix cache as well, the image tower's prefix runs only for images not seen
        before, and those inputs run the text prefix and the fused top from it.
        """
        ids, mask = self.text(batched_inputs)
        k = len(image_keys)
        if self.feature_cache is None:
            images = torch.cat([self.images(batched_inputs, key) for key in image_keys])
            return self.cls_feats(images, ids.repeat(k, 1), mask.repeat(k, 1))
        rows = [(x[key], j) for key in image_keys for j, x in enumerate(batched_inputs)]

        def backbone_part(todo: list[int]) -> torch.Tensor:
            text_rows = [rows[i][1] for i in todo]
            if self.image_prefix_cache is None:
                images = self.images([{"image": rows[i][0]} for i in todo])
                image_features, text = self.backbone(
                    images, ids[text_rows], mask[text_rows], fuse=True
                )
            else:
                image_features, text = self._fused_from_image_prefix(
                    [rows[i][0] for i in todo], ids[text_rows], mask[text_rows]
                )
            return torch.cat(
                [text["hidden"][:, 0], self._tokens(image_features).mean(dim=1)], dim=-1
            )

        # keyed by the records' own (host) tensors: no device transfer per row
        texts = [(x["input_ids"], x["attention_mask"]) for x in batched_inputs]
        digests = [self._digest(image, *texts[j]) for image, j in rows]
        cached = self._cached(digests, backbone_part)
        text_dim = cached.shape[1] - self.cross_modal_image_transform.in_features
        feats = self.fused_heads(cached[:, None, :text_dim], cached[:, None, text_dim:])
        feats = feats["cls_feats"]
        return feats if self.cls_bn is None else self.cls_bn(feats)

    def _fused_from_image_prefix(
        self, images: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The fused backbone's outputs for (uint8 (3, S, S) image, (T,) text) pairs, the image
        prefixes read from the image-prefix cache (computed, one batch, for images not seen). The
        image features hold the stages the fused top completes (the last one among them)."""

        def image_part(todo: list[int]) -> torch.Tensor:
            return self.backbone.forward_image_prefix(
                self.images([{"image": images[i]} for i in todo])
            )[0]

        x = self._cached([self._digest(im) for im in images], image_part, self.image_prefix_cache)
        hidden, layer_mask, text_mask = self.backbone.forward_text_prefix(input_ids, attention_mask)
        prefix = FusionPrefix(
            image=x, text=hidden, text_layer_mask=layer_mask, attention_mask=text_mask
        )
        return self.backbone.forward_fused(prefix)

    @staticmethod
    def _digest(*tensors: torch.Tensor) -> bytes:
        """A content key of one input, e.g. its image (C, S, S) and text (T,) ids and mask."""
        h = hashlib.blake2b(digest_size=16)
        for t in tensors:
            t = t.detach().cpu().contiguous()
            h.update(repr((t.dtype, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes())
        return h.digest()

    def forward(self, batched_inputs: list[dict]):  # pragma: no cover - abstract
        raise NotImplementedError
