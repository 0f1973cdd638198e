"""``FIBERCaption``: FIBER's fused text tower used as a causal caption decoder (coarse spec §1.8,
§5.6).

* Image: every Swin stage without fusion and without the final norm (raw last-stage tokens I; the
  coarse configs this project builds on set ``MODEL.SWIN.OUT_NORM`` off, so ``forward_image`` gives them).
* Text: the RoBERTa tower with a causal + padding mask, every layer's output norm on; fused text
  layers cross-attend (one way) to ``cross_modal_att_layers[j](I)`` (1024 -> 512 adapters) for all but
  the last two text layers, to I itself for the last two.
* Head: ``cross_modal_text_transform`` then ``mlm_score`` as the next-token LM head.

The model is a :class:`~fiber_d2.modeling.meta_arch.FIBERFusedTask` (normalisation, the shared
transforms and poolers, head init) whose heads are ``mlm_score`` and the adapters. Module names follow
the original caption checkpoint (``fiber_coco_caption.ckpt``): besides the parts above it holds the
modules the original builds for every task (``image_norm`` = ``vit_model.norm``, the ``*_itc``
transforms, the poolers), so a converted checkpoint loads with no missing or unexpected key.

Training (``CAPTION.STAGE``): ``mle``, ``gold`` (frozen snapshot every ``GOLD_UPDATE_PERIOD``
iterations) or ``cider`` (sampled captions scored by CIDEr-D against the image's references, which
the records carry as ``references``). Inference decodes ``caption`` strings (beam or greedy), with a
key/value cache unless ``CAPTION.USE_CACHE`` is off.
"""

from __future__ import annotations

import copy
import logging

import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import nn

from fiber_d2.config import ConfigError
from fiber_d2.modeling.backbone.causal_text import TextKVCache
from fiber_d2.modeling.meta_arch import FIBERFusedTask
from fiber_d2.modeling.meta_arch.coarse_heads import MLMHead
from fiber_d2.text import build_tokenizer

from .cider import CiderD, references_by_image
from .decoding import DECODINGS, beam_search, greedy_search, original_beam_search, sample_captions
from .losses import (
    gold_loss,
    gold_weights,
    mle_loss,
    next_token_labels,
    reinforce_loss,
    sequence_logprob,
)

__all__ = ["FIBERCaption"]

logger = logging.getLogger(__name__)

STAGES = ("mle", "gold", "cider")


@META_ARCH_REGISTRY.register()
class FIBERCaption(FIBERFusedTask):
    """Captioning FIBER (see the module docstring)."""

    _PRETRAIN_ONLY = ()  # :meth:`_build_heads` builds no ITM head, temperature or queue
    # MODEL.COARSE.FEATURE_CACHE keeps the raw image tokens I (the text tower trains)
    CACHED_MODULE = "backbone.image_tower"
    CACHED_FREEZE = "MODEL.SWIN.FREEZE_AT 4"
    # this stage's own modules, absent from any pre-training checkpoint (coarse spec §6.2): starting
    # from one leaves them initialised, which the strict-weights check does not count as partial
    STAGE_HEADS = ("cross_modal_att_layers.",)

    @configurable
    def __init__(
        self,
        *,
        tokenizer,
        stage: str = "mle",
        decoding: str = "beam",
        beam_size: int = 5,
        max_length: int = 50,
        use_cache: bool = True,
        gold_update_period: int = 1000,
        gold_min_weight: float = 0.1,
        gold_original_divisor: bool = False,
        cider_alpha: float = 0.3,
        cider_samples: int = 5,
        cider_baseline: float = 1.0,
        cider: CiderD | None = None,
        **kwargs,
    ):
        """
        Args:
            tokenizer: the text tokenizer (special ids, decoding to strings).
            stage: "mle", "gold" or "cider".
            decoding: one of :data:`~captioning.decoding.DECODINGS` (``CAPTION.DECODING``).
            beam_size: beam width K.
            max_length: longest caption in tokens, ``<s>`` included.
            use_cache: decode with cached keys/values.
            gold_update_period: GOLD snapshot period in iterations.
            gold_min_weight: GOLD weight floor.
            gold_original_divisor: GOLD: the original's padding-count divisor.
            cider_alpha: weight of MLE in the CIDEr stage.
            cider_samples: samples per image.
            cider_baseline: constant baseline (CIDEr-D units).
            cider: CIDEr-D scorer with training document frequencies (needed for "cider").
            kwargs: the arguments of :class:`fiber_d2.modeling.meta_arch.FIBERCoarse` (the
                ``backbone``: only its unfused image path and its text tower are used; the losses,
                queue and ITC switches are not).
        """
        if stage not in STAGES:
            raise ConfigError(f"CAPTION.STAGE must be one of {STAGES}, got {stage!r}")
        if decoding not in DECODINGS:
            raise ConfigError(f"CAPTION.DECODING must be one of {DECODINGS}, got {decoding!r}")
        if stage == "cider" and cider is None:
            raise ConfigError("CAPTION.STAGE 'cider' needs a CIDEr-D scorer (training captions)")
        text_positions = kwargs["backbone"].text_tower.max_len
        if max_length > text_positions:
            raise ConfigError(
                f"CAPTION.MAX_LENGTH {max_length} exceeds the text tower's {text_positions} positions"
            )
        super().__init__(**kwargs)
        if self.feature_cache is not None and stage != "mle":
            logger.warning(
                "MODEL.COARSE.FEATURE_CACHE serves CAPTION.STAGE 'mle' only; the %r stage runs "
                "the image tower every step",
                stage,
            )
            self.feature_cache = None
        self.tokenizer = tokenizer
        self.bos, self.eos = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.pad, self.mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
        self.stage = stage
        self.decoding = decoding
        self.beam_size = beam_size
        self.max_length = max_length
        self.use_cache = use_cache
        self.gold_update_period = gold_update_period
        self.gold_min_weight = gold_min_weight
        self.gold_original_divisor = gold_original_divisor
        self.cider_alpha = cider_alpha
        self.cider_samples = cider_samples
        self.cider_baseline = cider_baseline
        self.cider = cider
        self._snapshot: list = []  # GOLD: [frozen copy] (a list, so it is not a submodule)
        self._snapshot_iter = -1

    def _build_heads(self, *, image_dim: int, text_dim: int, vocab_size: int, **_) -> None:
        """``mlm_score`` (the next-token head) and the image adapters ``cross_modal_att_layers``."""
        self.mlm_score = MLMHead(text_dim, vocab_size)
        # one adapter per text layer but the last two, as the original (only fused ones are used)
        text = self.backbone.text_tower
        num_layers = text.num_layers
        self.cross_modal_att_layers = nn.ModuleList(
            nn.Linear(image_dim, image_dim // 2) for _ in range(num_layers - 2)
        )
        self.adapted_layers = []
        for j in text.fused_layer_ids:
            key_dim = text.model.encoder.layer[j].crossattention_t2i.self.key.in_features
            adapted = j < num_layers - 2
            want = image_dim // 2 if adapted else image_dim
            if key_dim != want:
                raise ValueError(
                    f"fused text layer {j} reads {key_dim}-wide image tokens; the caption forward "
                    f"gives it {want} (adapters 1024->512 below the last two layers, coarse §1.8)"
                )
            if adapted:
                self.adapted_layers.append(j)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.CAPTION
        cider = None
        if c.STAGE == "cider":
            records = [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
            cider = CiderD.from_references(references_by_image(records))
        return {
            **super().from_config(cfg),
            "tokenizer": build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER),
            "stage": c.STAGE,
            "decoding": c.DECODING,
            "beam_size": c.BEAM_SIZE,
            "max_length": c.MAX_LENGTH,
            "use_cache": c.USE_CACHE,
            "gold_update_period": c.GOLD_UPDATE_PERIOD,
            "gold_min_weight": c.GOLD_MIN_WEIGHT,
            "gold_original_divisor": c.GOLD_ORIGINAL_DIVISOR,
            "cider_alpha": c.CIDER_ALPHA,
            "cider_samples": c.CIDER_SAMPLES,
            "cider_baseline": c.CIDER_BASELINE,
            "cider": cider,
        }

    # ------------------------------------------------------------------ forward pieces
    def encode_image(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Image tokens read by each fused text layer (unlike the ITC embedding of the base).

        Args:
            images: (B, 3, S, S) normalised.

        Returns:
            {text layer: (B, N, C_j)}: the raw last-stage tokens I (no fusion, no final norm),
            through ``cross_modal_att_layers[j]`` for all but the last two text layers.
        """
        return self.adapt_image_tokens(self._tokens(self.backbone.forward_image(images)))

    def adapt_image_tokens(self, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, N, C) raw last-stage tokens I -> what each fused text layer reads (see
        :meth:`encode_image`)."""
        return {
            j: (self.cross_modal_att_layers[j](tokens) if j in self.adapted_layers else tokens)
            for j in self.backbone.text_tower.fused_layer_ids
        }

    def text_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_tokens: dict[int, torch.Tensor] | None,
        cache: TextKVCache | None = None,
    ) -> tuple[torch.Tensor, TextKVCache]:
        """Next-token logits (B, T, V) of the causal forward, and the key/value cache."""
        hidden, cache = self.backbone.text_tower.forward_causal(
            input_ids, attention_mask, image_tokens, cache
        )
        return self.mlm_score(self.cross_modal_text_transform(hidden)), cache

    def forward_caption(self, images, input_ids, attention_mask) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for (B, 3, S, S) images and (B, T) captions."""
        return self.text_logits(input_ids, attention_mask, self.encode_image(images))[0]

    def caption_logits_of(self, batched_inputs: list[dict], input_ids, attention_mask):
        """:meth:`forward_caption` of the records' images; with the feature cache the image tower
        runs, without gradient, only for the images it has not seen."""
        if self.feature_cache is None:
            return self.forward_caption(self.images(batched_inputs), input_ids, attention_mask)

        def raw_tokens(rows: list[int]) -> torch.Tensor:
            images = self.images([batched_inputs[i] for i in rows])
            return self._tokens(self.backbone.forward_image(images))

        tokens = self._cached([self._digest(x["image"]) for x in batched_inputs], raw_tokens)
        return self.text_logits(input_ids, attention_mask, self.adapt_image_tokens(tokens))[0]

    # ------------------------------------------------------------------ decoding
    def _cached_step(self, state, prefix):
        tokens, cache = state
        new = prefix if cache is None else prefix[:, -1:]
        logits, cache = self.text_logits(new, None, tokens if cache is None else None, cache)
        return logits[:, -1], (None, cache)

    @staticmethod
    def _cached_select(state, index):
        tokens, cache = state
        if cache is None:
            return {j: t.index_select(0, index) for j, t in tokens.items()}, None
        return None, cache.select(index)

    def _reencode_step(self, tokens, prefix):
        logits, _ = self.text_logits(prefix, None, tokens)
        return logits[:, -1], tokens

    @staticmethod
    def _reencode_select(tokens, index):
        return {j: t.index_select(0, index) for j, t in tokens.items()}

    def decoder(self, image_tokens: dict[int, torch.Tensor], use_cache: bool | None = None):
        """(step, select, state) for :mod:`captioning.decoding` on encoded images."""
        use_cache = self.use_cache if use_cache is None else use_cache
        if use_cache:
            return self._cached_step, self._cached_select, (image_tokens, None)
        return self._reencode_step, self._reencode_select, image_tokens

    def _search_args(self) -> dict:
        return {
            "bos": self.bos,
            "eos": self.eos,
            "pad": self.pad,
            "banned": [self.mask_id] if self.mask_id is not None else [],
            "max_length": self.max_length,
            "device": self.device,
        }

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        *,
        decoding: str | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor:
        """Caption ids (B, L) (``<s>`` first) for (B, 3, S, S) normalised images."""
        tokens = self.encode_image(images)
        step, select, state = self.decoder(tokens, use_cache)
        decoding = decoding or self.decoding
        if decoding == "greedy":
            return greedy_search(step, select, state, images.shape[0], **self._search_args())
        search = original_beam_search if decoding == "beam" else beam_search
        ids, _ = search(
            step, select, state, images.shape[0], beam_size=self.beam_size, **self._search_args()
        )
        return ids

    def decode_text(self, ids: torch.Tensor) -> list[str]:
        """Strings of caption ids, special tokens removed."""
        return [
            self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in ids
        ]

    # ------------------------------------------------------------------ training
    def forward(self, batched_inputs: list[dict]):
        """Training: ``{"loss_caption_*": ...}``. Inference: per record ``{"caption": str,
        "caption_ids": (L,) long}``, the decoded ids (``<s>`` first, L <= ``max_length``)."""
        if not self.training:
            ids = self.generate(self.images(batched_inputs))
            return [{"caption": c, "caption_ids": i} for c, i in zip(self.decode_text(ids), ids)]
        input_ids, mask = self.text(batched_inputs)
        labels = next_token_labels(input_ids, self.pad)
        if self.stage == "mle":
            logits = self.caption_logits_of(batched_inputs, input_ids, mask)
            return {"loss_caption_mle": mle_loss(logits, labels)}
        images = self.images(batched_inputs)
        if self.stage == "gold":
            return {"loss_caption_gold": self._gold(images, input_ids, mask, labels)}
        return self._cider(batched_inputs, images, input_ids, mask, labels)

    def _gold(self, images, input_ids, mask, labels) -> torch.Tensor:
        iteration = get_event_storage().iter
        if not self._snapshot or (
            iteration % self.gold_update_period == 0 and iteration > self._snapshot_iter
        ):
            self._take_snapshot(iteration)
        frozen = self._snapshot[0]
        with torch.no_grad():
            weights = gold_weights(
                frozen.forward_caption(images, input_ids, mask), labels, self.gold_min_weight
            )
        logits = self.forward_caption(images, input_ids, mask)
        return gold_loss(logits, labels, weights, original_divisor=self.gold_original_divisor)

    def _take_snapshot(self, iteration: int) -> None:
        self._snapshot = []
        cider, self.cider = self.cider, None  # not copied
        try:
            frozen = copy.deepcopy(self)
        finally:
            self.cider = cider
        frozen.eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        self._snapshot = [frozen]
        self._snapshot_iter = iteration
        logger.info("GOLD: frozen snapshot of the model at iteration %d", iteration)

    def _cider(self, batched_inputs, images, input_ids, mask, labels) -> dict[str, torch.Tensor]:
        references = []
        for x in batched_inputs:
            refs = x.get("references")
            if not refs:
                raise ValueError(
                    f"CIDEr stage: training record of image {x.get('image_id')} "
                    f"({x.get('file_name')}) has no 'references' captions"
                )
            references.append(list(refs))
        b, n = images.shape[0], self.cider_samples
        # sampled in train mode (dropout on) re-encoding the whole prefix at every step, as the
        # original: each step draws its own dropout masks (and drop paths), where cached keys /
        # values would keep those of the step that computed them
        with torch.no_grad():
            step, select, state = self.decoder(self.encode_image(images), use_cache=False)
            samples = sample_captions(step, select, state, b, n, **self._search_args())
        sample_mask = (samples != self.pad).long()
        repeated = images.repeat_interleave(n, dim=0)
        logits = self.forward_caption(repeated, samples, sample_mask)
        logprob = sequence_logprob(logits, next_token_labels(samples, self.pad))
        rewards = self.cider.scores(
            self.decode_text(samples), [r for r in references for _ in range(n)]
        )
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=self.device)
        rl = reinforce_loss(logprob, rewards, b, self.cider_baseline)
        mle = mle_loss(self.forward_caption(images, input_ids, mask), labels)
        get_event_storage().put_scalar("caption/sample_cider", float(rewards.mean()))
        return {
            "loss_caption_mle": self.cider_alpha * mle,
            "loss_caption_rl": (1.0 - self.cider_alpha) * rl,
        }
