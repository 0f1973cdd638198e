"""Conversion of released FIBER checkpoints to fiber_d2 state dicts (pure functions, no file I/O).

Fine-grained ``.pth`` (fine spec §6.1, §7): ``{"model": ..., "model_ema"?: ...}`` saved from a DDP model.

=====================================================  ==============================================
original key (after ``module.``)                          fiber_d2 key (detector ``FIBER``)
=====================================================  ==============================================
``fusion_backbone.backbone.{body,fpn}.*``,               :func:`~fiber_d2.modeling.backbone.naming.
``fusion_backbone.language_backbone.body.model.*``       original_to_fiber_d2_key` (``backbone.*``)
``rpn.head.X``                                           ``head.X`` (the grounding head keeps the names)
``rpn.anchor_generator.cell_anchors.*``                  dropped (recomputed)
=====================================================  ==============================================

Coarse-grained Lightning ``.ckpt`` (coarse spec §5.1, §6): ``{"state_dict": ...}`` without a prefix.

=====================================================  ==============================================
original key                                              fiber_d2 key (``FIBERCoarse`` / ``FIBER``)
=====================================================  ==============================================
``vit_model.*``, ``text_transformer.*``                  ``backbone.{image,text}_tower.*`` /
                                                         ``backbone.bottom_up.{image,text}_tower.*``
``vit_model.norm.*``                                     ``image_norm.*`` / the last output norm
``cross_modal_*``, ``itm_score.*``, ``mlm_score.*``,     same name / dropped (not in the detector)
``temp``
``image_queue`` ... ``text_input_mask_queue``            dropped (re-initialised by the model)
``rank_output.*``                                        dropped (a copy of ``itm_score.fc`` row 1)
``vqa_classifier.*``, ``nlvr2_classifier.*``            same name when the target model has them
                                                         (projects/VQA, projects/NLVR2), else dropped
``cross_modal_att_layers.*``                             dropped (captioning adapters)
=====================================================  ==============================================

Everywhere: ``relative_position_index``, ``attn_mask``, ``position_ids`` / ``token_type_ids`` buffers are
dropped (recomputed); the unused ``crossattention_t2i.output.LayerNorm``, text ``pooler`` and
``alpha_t2i`` of layers without fusion are dropped. Given the target model's state dict, keys it lacks
are skipped, ``relative_position_bias_table`` rows are resized bicubically when the window differs
(coarse §5.1), and any other shape difference is reported and not written.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..modeling.backbone.naming import (
    COARSE_IMAGE_PREFIX,
    COARSE_TEXT_PREFIX,
    FINE_FPN_PREFIX,
    FINE_IMAGE_PREFIX,
    FINE_TEXT_PREFIX,
    original_to_fiber_d2_key,
)

__all__ = [
    "ConversionReport",
    "convert_fine_state_dict",
    "convert_coarse_state_dict",
    "convert_caption_state_dict",
    "unwrap_state_dict",
    "resize_relative_position_table",
    "NOT_A_TENSOR",
    "RECOMPUTED_BUFFER",
    "ITC_QUEUE",
    "UNUSED_IN_ORIGINAL",
    "RANK_OUTPUT_ALIAS",
    "TASK_HEAD",
    "COARSE_ONLY",
    "NOT_IN_MODEL",
    "PARTIAL_MODULE_PREFIX",
    "UNRECOGNISED",
]

logger = logging.getLogger(__name__)

# Reasons recorded in ConversionReport.skipped.
NOT_A_TENSOR = "not a tensor"
RECOMPUTED_BUFFER = "recomputed buffer"
ITC_QUEUE = "ITC queue buffer (re-initialised by the model)"
UNUSED_IN_ORIGINAL = "unused by the original model"
RANK_OUTPUT_ALIAS = "rank_output (a copy of itm_score.fc row 1)"
TASK_HEAD = "downstream task head not built by the target model (VQA / NLVR2 / captioning)"
COARSE_ONLY = "coarse-stage head, not part of the detector"
NOT_IN_MODEL = "not in the target model"
PARTIAL_MODULE_PREFIX = "'module.' prefix on only some keys"
UNRECOGNISED = "unrecognised key"

_BACKBONE_PREFIXES = (
    FINE_IMAGE_PREFIX,
    FINE_FPN_PREFIX,
    FINE_TEXT_PREFIX,
    COARSE_IMAGE_PREFIX,
    COARSE_TEXT_PREFIX,
)
_BUFFER_SUFFIXES = (
    "relative_position_index",
    "attn_mask",
    "embeddings.position_ids",
    "embeddings.token_type_ids",
)
_QUEUES = frozenset(
    {
        "image_queue",
        "text_queue",
        "queue_ptr",
        "queue_total",
        "image_input_queue",
        "text_input_queue",
        "text_input_mask_queue",
    }
)
_COARSE_HEADS = ("cross_modal_", "itm_score.", "mlm_score.")
_TASK_HEADS = ("vqa_classifier.", "nlvr2_classifier.", "cross_modal_att_layers.")
_NUMBER = re.compile(r"\.\d+(?=\.|$)")
_IMAGE_STAGE = re.compile(r"^layers\.(\d+)\.")
_TEXT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")

Shape = tuple[int, ...]


@dataclass
class ConversionReport:
    """What a conversion did, key by key.

    Attributes:
        source: the container entry that was converted (``"model"``, ``"model_ema"``,
            ``"state_dict"``, ... joined by ``/``; ``"<flat>"`` for a bare state dict).
        stripped_module_prefix: whether a ``module.`` prefix carried by every key was removed.
        mapped: (original key, fiber_d2 key) of every tensor written.
        skipped: (original key, reason) of every entry not written.
        resized: (fiber_d2 key, checkpoint shape, model shape) of relative-position tables resized.
        shape_mismatches: (original key, fiber_d2 key, checkpoint shape, model shape) not written.
        missing_in_checkpoint: target-model keys left unfilled (only with ``model_state``).
        notes: human-readable remarks (task heads dropped, diverged aliases, ...).
    """

    source: str = "<flat>"
    stripped_module_prefix: bool = False
    mapped: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resized: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    shape_mismatches: list[tuple[str, str, Shape, Shape]] = field(default_factory=list)
    missing_in_checkpoint: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, list[str]]:
        """Original keys grouped by skip reason."""
        out: dict[str, list[str]] = {}
        for key, reason in self.skipped:
            out.setdefault(reason, []).append(key)
        return out

    def counts(self) -> dict[str, int]:
        """Counts of mapped / skipped / resized / shape-mismatched / missing entries."""
        return {
            "mapped": len(self.mapped),
            "skipped": len(self.skipped),
            "resized": len(self.resized),
            "shape_mismatches": len(self.shape_mismatches),
            "missing_in_checkpoint": len(self.missing_in_checkpoint),
        }

    def summary(self) -> str:
        """A multi-line, human-readable summary (counts, skip reasons, mismatches, missing keys)."""
        c = self.counts()
        lines = [
            f"converted '{self.source}'"
            + (" (stripped 'module.')" if self.stripped_module_prefix else "")
            + f": {c['mapped']} tensors mapped, {c['skipped']} skipped, "
            f"{c['shape_mismatches']} shape mismatches, {c['resized']} resized"
        ]
        for reason, keys in sorted(self.skipped_by_reason().items()):
            lines.append(f"  skipped {len(keys)} ({reason}): {_key_patterns(keys)}")
        for orig, new, shape_ckpt, shape_model in self.shape_mismatches:
            lines.append(
                f"  shape mismatch {orig} -> {new}: checkpoint {shape_ckpt}, model {shape_model}"
            )
        if self.resized:
            changes = sorted({f"{a[0]}->{b[0]}" for _, a, b in self.resized})
            lines.append(
                f"  resized {c['resized']} relative-position tables (rows {', '.join(changes)}): "
                f"{_key_patterns([k for k, _, _ in self.resized])}"
            )
        if self.missing_in_checkpoint:
            lines.append(
                f"  {c['missing_in_checkpoint']} model tensors not in the checkpoint: "
                f"{_key_patterns(self.missing_in_checkpoint)}"
            )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- helpers
def _key_patterns(keys: list[str], limit: int = 10) -> str:
    """'pattern(count), ...': ``weight``/``bias`` merged per module, numeric components as ``*``."""
    modules = (k.rsplit(".", 1)[0] if k.endswith((".weight", ".bias")) else k for k in keys)
    counts = Counter(_NUMBER.sub(".*", "." + m)[1:] for m in modules)
    shown = [f"{p}({n})" for p, n in sorted(counts.items())[:limit]]
    more = len(counts) - limit
    return ", ".join(shown) + (f", ... {more} more" if more > 0 else "")


def _log(report: ConversionReport) -> None:
    """One INFO line with the counts; the full summary at DEBUG."""
    summary = report.summary()
    logger.info("%s", summary.splitlines()[0])
    logger.debug("%s", summary)


def unwrap_state_dict(checkpoint: Mapping, *, use_ema: bool = False) -> tuple[dict, str]:
    """Find the state dict inside a checkpoint container.

    ``model_ema`` is taken when ``use_ema``; otherwise nested ``model`` / ``state_dict`` entries are
    followed (fine-grained ``.pth``: ``model``; Lightning ``.ckpt``: ``state_dict``).

    Args:
        checkpoint: the object read from the file.
        use_ema: take the EMA weights (``model_ema``) instead of the raw ones.

    Returns:
        (state dict, path of the entry taken, e.g. ``"model"`` or ``"<flat>"``).

    Raises:
        TypeError: the checkpoint is not a mapping.
        KeyError: ``use_ema`` without a ``model_ema`` entry.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    path: list[str] = []
    current = checkpoint
    if use_ema:
        if not isinstance(current.get("model_ema"), Mapping):
            raise KeyError(
                f"use_ema: the checkpoint has no 'model_ema' dict (top-level entries: "
                f"{sorted(map(str, checkpoint))[:10]})"
            )
        current, path = current["model_ema"], ["model_ema"]
    while True:
        inner = next(
            (n for n in ("model", "state_dict") if isinstance(current.get(n), Mapping)), None
        )
        if inner is None:
            break
        current = current[inner]
        path.append(inner)
    return dict(current), "/".join(path) or "<flat>"


def resize_relative_position_table(table: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Resize a Swin relative-position bias table to another window (coarse spec §5.1).

    The table is viewed as (heads, 2w-1, 2w-1), interpolated bicubically to (2w'-1, 2w'-1) and
    flattened back, rows in (row, column) order of the new grid. The spec leaves ``align_corners``
    open; the original's ``swin_adapt_position_encoding`` (coarse_grained/fiber/modules/swin_helpers.py)
    calls ``interpolate(mode="bicubic")`` without it, i.e. False, as here.

    Args:
        table: ((2w-1)^2, heads).
        num_rows: (2w'-1)^2.

    Returns:
        (num_rows, heads), the input dtype.

    Raises:
        ValueError: a table or target that is not a square grid.
    """
    rows, heads = table.shape
    src, dst = round(rows**0.5), round(num_rows**0.5)
    if src * src != rows or dst * dst != num_rows:
        raise ValueError(
            f"relative-position table of {rows} rows cannot be resized to {num_rows}: not square grids"
        )
    work = torch.promote_types(table.dtype, torch.float32)  # half tables are resized in fp32
    grid = table.to(work).t().reshape(1, heads, src, src)
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.reshape(heads, num_rows).t().contiguous().to(table.dtype)


def _shape(value) -> Shape:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _strip_module(state: dict) -> tuple[dict, bool]:
    """Remove ``module.`` only when every key carries it (fine spec §6.1)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}, True
    return state, False


def _architecture(keys: list[str]) -> dict[str, int]:
    """Swin stages, text layers and fused text layers of the original, read from its keys."""
    stages, layers, fused = [], [], set()
    for key in keys:
        for prefix in (FINE_IMAGE_PREFIX, COARSE_IMAGE_PREFIX):
            if key.startswith(prefix) and (m := _IMAGE_STAGE.match(key[len(prefix) :])):
                stages.append(int(m.group(1)))
        for prefix in (FINE_TEXT_PREFIX, COARSE_TEXT_PREFIX):
            if key.startswith(prefix) and (m := _TEXT_LAYER.match(key[len(prefix) :])):
                layers.append(int(m.group(1)))
                if m.group(2).startswith("crossattention_t2i."):
                    fused.add(int(m.group(1)))
    num_layers = max(layers) + 1 if layers else 12
    return {
        "num_stages": max(stages) + 1 if stages else 4,
        "num_text_layers": num_layers,
        "num_fusion_layers": len(fused) if layers else 6,
    }


def _backbone_key(key: str, arch: dict[str, int], **naming_kwargs) -> tuple[str | None, str | None]:
    """(fiber_d2 key, None) or (None, skip reason) for an original backbone / FPN key."""
    if key.endswith(_BUFFER_SUFFIXES):
        return None, RECOMPUTED_BUFFER
    for prefix in (FINE_TEXT_PREFIX, COARSE_TEXT_PREFIX):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if rest.startswith("pooler."):
                return None, UNUSED_IN_ORIGINAL
            m = _TEXT_LAYER.match(rest)
            if m and m.group(2).startswith("crossattention_t2i.output.LayerNorm."):
                return None, UNUSED_IN_ORIGINAL
            first_fused = arch["num_text_layers"] - arch["num_fusion_layers"]
            if m and m.group(2) == "alpha_t2i" and int(m.group(1)) < first_fused:
                return None, UNUSED_IN_ORIGINAL
    for prefix in (FINE_IMAGE_PREFIX, COARSE_IMAGE_PREFIX):
        if key.startswith(prefix + "head."):  # a Swin classification head
            return None, UNUSED_IN_ORIGINAL
    new = original_to_fiber_d2_key(key, **arch, **naming_kwargs)
    return (new, None) if new is not None else (None, UNRECOGNISED)


def _convert(
    original: Mapping,
    map_key: Callable[[str, dict[str, int]], tuple[str | None, str | None]],
    *,
    model_state: Mapping | None,
    use_ema: bool,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    state, source = unwrap_state_dict(original, use_ema=use_ema)
    report = ConversionReport(source=source)
    tensors = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        else:
            report.skipped.append((str(key), NOT_A_TENSOR))
    tensors, report.stripped_module_prefix = _strip_module(tensors)
    arch = _architecture(list(tensors))
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in tensors.items():
        if key.startswith("module."):
            report.skipped.append((key, PARTIAL_MODULE_PREFIX))
            continue
        new, reason = map_key(key, arch)
        if new is None:
            report.skipped.append((key, reason or UNRECOGNISED))
            continue
        if new in origin:
            raise ValueError(f"original keys {origin[new]!r} and {key!r} both map to {new!r}")
        if model_state is not None:
            if new not in model_state:
                report.skipped.append((key, NOT_IN_MODEL))
                continue
            want, have = _shape(model_state[new]), tuple(value.shape)
            if want != have:
                if (
                    new.endswith("relative_position_bias_table")
                    and len(want) == len(have) == 2
                    and want[1] == have[1]
                ):
                    try:
                        value = resize_relative_position_table(value, want[0])
                        report.resized.append((new, have, want))
                    except ValueError:
                        report.shape_mismatches.append((key, new, have, want))
                        continue
                else:
                    report.shape_mismatches.append((key, new, have, want))
                    continue
        converted[new] = value
        origin[new] = key
        report.mapped.append((key, new))
    if model_state is not None:
        report.missing_in_checkpoint = sorted(set(model_state) - set(converted))
    if any(reason == PARTIAL_MODULE_PREFIX for _, reason in report.skipped):
        report.notes.append("some keys start with 'module.' and some do not; the prefix was kept")
    return converted, report


# ---------------------------------------------------------------------------------------- public
def convert_fine_state_dict(
    original: Mapping,
    *,
    model_state: Mapping | None = None,
    use_ema: bool = False,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert a fine-grained FIBER checkpoint (``GeneralizedVLRCNN``) to the ``FIBER`` detector.

    Args:
        original: the loaded file: a container (``model``, ``model_ema``, ...) or a bare state dict,
            keys optionally prefixed by ``module.``.
        model_state: the target model's state dict (tensors or shapes; meta tensors are fine). When
            given, keys the model lacks are skipped, relative-position tables are resized to its
            window and other shape mismatches are reported instead of written.
        use_ema: convert the ``model_ema`` entry.

    Returns:
        (converted state dict with fiber_d2 keys, :class:`ConversionReport`).
    """

    def map_key(key: str, arch: dict[str, int]) -> tuple[str | None, str | None]:
        if key.startswith("rpn.anchor_generator."):
            return None, RECOMPUTED_BUFFER
        if key.startswith("rpn.head."):
            return "head." + key[len("rpn.head.") :], None
        if key.startswith(_BACKBONE_PREFIXES):
            return _backbone_key(key, arch)
        return None, UNRECOGNISED

    converted, report = _convert(original, map_key, model_state=model_state, use_ema=use_ema)
    _log(report)
    return converted, report


def convert_coarse_state_dict(
    original: Mapping,
    *,
    target: str = "coarse",
    model_state: Mapping | None = None,
    use_ema: bool = False,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert a coarse-grained FIBER checkpoint (Lightning ``FIBERTransformerSS``).

    Args:
        original: the loaded file (``{"state_dict": ...}`` or a bare state dict).
        target: ``"coarse"`` for :class:`~fiber_d2.modeling.meta_arch.FIBERCoarse` (towers under
            ``backbone.``, final image norm as ``image_norm``, ITC/ITM/MLM heads kept) or ``"fine"``
            for the ``FIBER`` detector's fused backbone (``backbone.bottom_up.``; coarse heads
            dropped). With ``"fine"``, ``vit_model.norm`` becomes the detector's last output norm
            (``norm3``); the original fine-grained loader's suffix matching never pairs the two and
            left it at its initialisation.
        model_state: the target model's state dict (see :func:`convert_fine_state_dict`). Task
            heads (``vqa_classifier.*``, ``nlvr2_classifier.*``) are kept only when it has them
            (a task model such as projects/VQA's ``FIBERVQA`` with ``target="coarse"``).
        use_ema: convert the ``model_ema`` entry.

    Returns:
        (converted state dict with fiber_d2 keys, :class:`ConversionReport`).

    Raises:
        ValueError: an unknown ``target``.
    """
    if target not in ("coarse", "fine"):
        raise ValueError(f"target must be 'coarse' or 'fine', got {target!r}")

    def map_key(key: str, arch: dict[str, int]) -> tuple[str | None, str | None]:
        return _coarse_key(key, arch, target, model_state)

    converted, report = _convert(original, map_key, model_state=model_state, use_ema=use_ema)
    state, _ = unwrap_state_dict(original, use_ema=use_ema)
    _check_rank_output(state, report)
    if any(reason == TASK_HEAD for _, reason in report.skipped):
        report.notes.append(
            "VQA / NLVR2 / captioning heads dropped: the target model does not build them"
        )
    _log(report)
    return converted, report


def _coarse_key(
    key: str, arch: dict[str, int], target: str, model_state: Mapping | None = None
) -> tuple[str | None, str | None]:
    """(fiber_d2 key, None) or (None, skip reason) for a coarse checkpoint key (``target`` as in
    :func:`convert_coarse_state_dict`; a task model's head keys in ``model_state`` are kept)."""
    naming = (
        {"backbone_prefix": "backbone.", "final_norm": "image_norm"} if target == "coarse" else {}
    )
    if key in _QUEUES:
        return None, ITC_QUEUE
    if key.startswith("rank_output."):
        return None, RANK_OUTPUT_ALIAS
    if key.startswith(_TASK_HEADS):
        if target == "coarse" and model_state is not None and key in model_state:
            return key, None  # a task model (VQA / NLVR2) keeps its head's names
        return None, TASK_HEAD
    if key == "temp" or key.startswith(_COARSE_HEADS):
        return (key, None) if target == "coarse" else (None, COARSE_ONLY)
    if key.startswith(_BACKBONE_PREFIXES):
        return _backbone_key(key, arch, **naming)
    return None, UNRECOGNISED


# Caption checkpoints (``fiber_coco_caption.ckpt``, coarse spec §1.8, §6.2) -> the Captioning
# project's ``FIBERCaption``: the coarse table (target "coarse") plus the caption head below.
#
# =====================================================  ==============================================
# original key                                              fiber_d2 key (``FIBERCaption``)
# =====================================================  ==============================================
# ``cross_modal_att_layers.{0..L-3}.{weight,bias}``        same name (1024 -> 512 image adapters)
# =====================================================  ==============================================
_CAPTION_HEADS = ("cross_modal_att_layers.",)


def convert_caption_state_dict(
    original: Mapping,
    *,
    model_state: Mapping | None = None,
    use_ema: bool = False,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert a FIBER caption checkpoint (Lightning ``.ckpt``) to ``FIBERCaption``.

    Every key is mapped as by :func:`convert_coarse_state_dict` with ``target="coarse"`` (towers under
    ``backbone.``, ``vit_model.norm`` as ``image_norm``, transforms / poolers / ``mlm_score`` by name),
    except the caption adapters ``cross_modal_att_layers.*``, which keep their names instead of being
    dropped as a task head.

    Args:
        original: the loaded file (``{"state_dict": ...}`` or a bare state dict).
        model_state: the target model's state dict (see :func:`convert_fine_state_dict`).
        use_ema: convert the ``model_ema`` entry.

    Returns:
        (converted state dict with fiber_d2 keys, :class:`ConversionReport`).
    """

    def map_key(key: str, arch: dict[str, int]) -> tuple[str | None, str | None]:
        if key.startswith(_CAPTION_HEADS):
            return key, None
        return _coarse_key(key, arch, "coarse")

    converted, report = _convert(original, map_key, model_state=model_state, use_ema=use_ema)
    _log(report)
    return converted, report


def _check_rank_output(state: Mapping, report: ConversionReport) -> None:
    """Note when ``rank_output`` no longer equals ``itm_score.fc`` row 1 (retrieval fine-tuning)."""
    prefix = "module." if report.stripped_module_prefix else ""
    pairs = [("weight", slice(1, 2)), ("bias", slice(1, 2))]
    for name, row in pairs:
        rank = state.get(f"{prefix}rank_output.{name}")
        itm = state.get(f"{prefix}itm_score.fc.{name}")
        if not (isinstance(rank, torch.Tensor) and isinstance(itm, torch.Tensor)):
            continue
        if rank.is_meta or itm.is_meta:
            continue
        if rank.shape != itm[row].shape or not torch.equal(rank, itm[row]):
            report.notes.append(
                f"rank_output.{name} differs from itm_score.fc.{name}[1]; it was dropped anyway "
                "(fiber_d2 scores retrieval with itm_score column 1)"
            )
            logger.warning("%s", report.notes[-1])
