"""``FIBERCheckpointer``: detectron2's checkpointer with safe loading, strict weights and the
coarse-to-fine hand-off.

* Files are read by :func:`~fiber_d2.checkpoint.safe_io.load_checkpoint_file`: ``torch.load`` with
  ``weights_only=True``, safetensors, or a numpy-only unpickler for ``.pkl``; nothing else is
  unpickled, and an unsafe or unreadable file is one :class:`CheckpointError` line naming it.
* A file in the ORIGINAL FIBER layout (``fusion_backbone.`` / ``rpn.`` / ``vit_model.`` /
  ``text_transformer.`` keys) is converted on the fly with the code of
  ``tools/convert_fiber_checkpoint.py`` (:func:`~fiber_d2.checkpoint.layout.convert_original`),
  logged once per file.
* A coarse-stage checkpoint (``FIBERCoarse``: towers under ``backbone.``) loaded into the detector
  (towers under ``backbone.bottom_up.``) is re-rooted automatically, so ``MODEL.WEIGHTS`` can point at
  the coarse run's ``model_final.pth``. Keys the detector does not have (poolers, ITM/MLM heads,
  queues) are dropped; keys the coarse stage never had (FPN, head) keep their initialisation.
* Strict weights: when more than :data:`PARTIAL_LOAD_TOLERANCE` of the model's parameters (by count
  or by elements; wrong shapes count as missing) are not filled from the file, loading fails with
  one line listing the missing groups, unless ``partial_ok`` (``MODEL.WEIGHTS_PARTIAL_OK``). Parts a
  training stage is expected to add (everything outside the two towers when a coarse checkpoint
  feeds the detector; a task model's ``STAGE_HEADS`` when the file has none of them) are not
  counted, except when the model is loaded to be used as it is (``inference``: evaluation,
  prediction), where an untrained head would make every output meaningless. Nor are a coarse
  model's pre-training heads that its losses never read (``heads_not_read``) when the file has none
  of them: the original builds them only for its losses.
* Relative-position bias tables of another window (a coarse checkpoint fine-tuned at another
  resolution, coarse spec §5.1) are resized bicubically to the model's window; the index buffers are
  recomputed by the model.
* A run that starts from ``MODEL.WEIGHTS`` (not resuming) keeps its own initialisation of the
  buffers of modules marked ``fresh_each_run`` (the ITC queue: the original drops the queue when it
  loads a checkpoint for fine-tuning, coarse spec §5.1); ``--resume`` restores them.
* Missing / unexpected keys are summarised per module in one log line each, not one line per tensor.
* Checkpoints and ``last_checkpoint`` are written whole or not at all (a ``.tmp`` file, synced, then
  renamed): a run killed while saving keeps its previous checkpoints, and ``--resume`` continues.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .layout import COARSE, FINE, convert_original, original_layout
from .safe_io import (
    CheckpointError,
    load_checkpoint_file,
    one_line,
    remove_stale_temporaries,
    write_whole,
)

__all__ = [
    "FIBERCheckpointer",
    "CheckpointError",
    "PARTIAL_LOAD_TOLERANCE",
    "load_state_dict_file",
    "load_model_weights",
    "summarize_keys",
    "weights_to_load",
    "check_weights_before_run",
    "final_is_current",
    "run_finished",
]

logger = logging.getLogger(__name__)

_TOWERS = ("image_tower.", "text_tower.")
_DETECTOR_TOWERS = ("backbone.bottom_up.image_tower.", "backbone.bottom_up.text_tower.")
# Per-level output norms the detector adds on top of the image tower (the coarse stage has none).
_DETECTOR_OUT_NORM = re.compile(r"^backbone\.bottom_up\.image_tower\.norm\d+\.")

# Share of the model's parameters (by count or by elements) that may stay unfilled by a checkpoint
# without MODEL.WEIGHTS_PARTIAL_OK. A small share covers heads a config resizes (e.g. a class count).
PARTIAL_LOAD_TOLERANCE = 0.01

# file path -> ((size, mtime_ns), raw loaded object): a file read by a pre-flight check, handed to
# the next load of the same unchanged file instead of being read twice (one entry at most).
_PRELOADED: dict[str, tuple[tuple[int, int], object]] = {}
_LOGGED_CONVERSIONS: set[str] = set()
# torch's per-tensor UserWarning when a state dict is loaded into a model on the meta device
META_COPY_WARNING = r".*copying from a non-meta parameter in the checkpoint to a meta parameter"


def _signature(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def load_state_dict_file(path: str) -> dict:
    """Load a checkpoint file safely; a bare state dict is wrapped as ``{"model": ...}``.

    Raises:
        CheckpointError: missing, unreadable or unsafe file (one line naming it).
    """
    loaded = load_checkpoint_file(path)
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict")
    loaded = dict(loaded)
    if "model" not in loaded and "state_dict" not in loaded:
        loaded = {"model": loaded}
    return loaded


def summarize_keys(keys: list[str], depth: int = 2) -> str:
    """'prefix(count), ...' grouping keys by their first ``depth`` name components."""
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{p}({n})" for p, n in sorted(counts.items()))


def _group_depth(key: str) -> int:
    return 4 if key.startswith("backbone.bottom_up.") else 2


def _groups(keys: list[str], limit: int = 8) -> str:
    counts = Counter(".".join(k.split(".")[: _group_depth(k)]) for k in keys)
    shown = [f"{p}({n})" for p, n in sorted(counts.items())[:limit]]
    more = len(counts) - limit
    return ", ".join(shown) + (f", ... {more} more" if more > 0 else "")


def _reroot_coarse(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Move ``backbone.<tower>.*`` to ``backbone.bottom_up.<tower>.*`` when the model expects that."""
    out = {}
    for k, v in state.items():
        if k.startswith("backbone.") and k[len("backbone.") :].startswith(_TOWERS):
            out["backbone.bottom_up." + k[len("backbone.") :]] = v
        elif k in model_keys:
            out[k] = v
    dropped = [k for k in state if not k.startswith("backbone.") and k not in model_keys]
    logger.info(
        "Loading a coarse-stage checkpoint into the detector: %d backbone tensors re-rooted under "
        "backbone.bottom_up; %d coarse-only tensors dropped (%s)",
        sum(k.startswith("backbone.bottom_up.") for k in out),
        len(dropped),
        summarize_keys(dropped, 1),
    )
    return out


def _is_detector(model_keys) -> bool:
    return any(k.startswith("backbone.bottom_up.") for k in model_keys)


def _resize_position_tables(state: dict, model_state: dict) -> dict:
    """Resize ``*relative_position_bias_table`` tensors whose window differs from the model's."""
    from .convert import resize_relative_position_table

    resized = 0
    for key, value in state.items():
        target = model_state.get(key)
        if not key.endswith("relative_position_bias_table") or target is None:
            continue
        if value.shape != target.shape and value.dim() == 2 and value.shape[1] == target.shape[1]:
            state[key] = resize_relative_position_table(value, target.shape[0])
            resized += 1
    if resized:
        logger.info("Resized %d relative-position tables to the model's window", resized)
    return state


class _WholeFileWrites:
    """detectron2's path manager, except that a local file opened for writing appears whole or not
    at all (:func:`write_whole`): a run killed while saving a checkpoint or ``last_checkpoint``
    leaves the previous ones intact, and ``--resume`` continues from them."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def open(self, path: str, mode: str = "r", **kwargs):
        if "w" in mode and "://" not in str(path) and not kwargs:
            return write_whole(str(path), mode)
        return self._inner.open(path, mode, **kwargs)


class FIBERCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with safe loading, strict weights, on-the-fly conversion of original
    FIBER files and the coarse-to-fine hand-off (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        partial_ok: bool | None = None,
        inference: bool = False,
        save_to_disk: bool | None = None,
        **checkpointables,
    ):
        """
        Args:
            model: the model to load into / save.
            save_dir: folder of saved checkpoints (and of ``last_checkpoint`` for resuming).
            partial_ok: accept a checkpoint that leaves many parameters unfilled. None: the
                ``trainer`` checkpointable's ``cfg.MODEL.WEIGHTS_PARTIAL_OK`` when there is
                one, else False.
            inference: the model is used as loaded (evaluation, prediction), not trained further:
                the heads a training stage adds count as missing too.
            save_to_disk, checkpointables: as detectron2's ``DetectionCheckpointer``.
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.path_manager = _WholeFileWrites(self.path_manager)
        self.partial_ok = partial_ok
        self.inference = inference
        self.keep_loaded = False  # pre-flight: keep the raw file for the next load of it
        self._path = ""
        self._coarse_into_detector = False
        self._fresh_run = False

    def _partial_ok(self) -> bool:
        if self.partial_ok is not None:
            return bool(self.partial_ok)
        trainer = self.checkpointables.get("trainer")
        try:
            return bool(trainer.cfg.MODEL.WEIGHTS_PARTIAL_OK)
        except (AttributeError, ReferenceError):
            return False

    # ------------------------------------------------------------------ reading
    def _read(self, filename: str):
        path = os.path.abspath(filename)
        cached = _PRELOADED.pop(path, None)
        if cached is not None and cached[0] == _signature(path):
            raw = cached[1]
        else:
            raw = load_checkpoint_file(filename)
        if self.keep_loaded:
            _PRELOADED.clear()
            _PRELOADED[path] = (_signature(path), raw)
        return raw

    def _load_file(self, filename: str) -> dict:
        self._path = filename
        self._coarse_into_detector = False
        raw = self._read(filename)
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{filename} holds a {type(raw).__name__}, not a checkpoint dict")
        loaded = dict(raw)
        if filename.endswith(".pkl"):
            return self._model_zoo_pickle(loaded)
        model_keys = self.model.state_dict()
        stage = original_layout(loaded)
        if stage is not None:
            target = FINE if _is_detector(model_keys) else COARSE
            try:
                converted, report = convert_original(
                    loaded, stage=stage, target=target, model_state=model_keys
                )
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{filename}: original FIBER {stage} checkpoint: {e}"
                ) from None
            if filename not in _LOGGED_CONVERSIONS:
                _LOGGED_CONVERSIONS.add(filename)
                logger.warning(
                    "%s is in the ORIGINAL FIBER %s layout; converted on the fly to the %s model "
                    "(%s). Convert it once with tools/convert_fiber_checkpoint.py to skip this.",
                    filename,
                    stage,
                    "detector" if target == FINE else "coarse",
                    report.summary().splitlines()[0],
                )
            self._coarse_into_detector = stage == COARSE and target == FINE
            return {"model": converted}
        if "model" not in loaded:
            loaded = {"model": loaded}
        if not isinstance(loaded["model"], Mapping):
            raise CheckpointError(f"{filename}: its 'model' entry is not a state dict")
        loaded["model"] = dict(loaded["model"])
        return loaded

    def _model_zoo_pickle(self, data: dict) -> dict:
        """detectron2's reading of model-zoo ``.pkl`` contents, on the safely unpickled data."""
        if "model" in data and "__author__" in data:
            data["model"] = dict(data["model"])
            return data
        blobs = data.get("blobs", data)  # Caffe2 / Detectron1 files
        if not isinstance(blobs, Mapping):
            raise CheckpointError(f"{self._path}: no 'model' or 'blobs' dict in the .pkl file")
        model = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
        return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}

    # ------------------------------------------------------------------ loading
    def resume_or_load(self, path: str, *, resume: bool = True):
        """detectron2's; when it loads ``path`` to start a run (not resuming a checkpoint of
        ``save_dir``), buffers of ``fresh_each_run`` modules keep the model's initialisation. When
        starts or resumes a run, the temporary files of saves a kill interrupted are removed first
        (also when the kill came before the first checkpoint was whole)."""
        self._fresh_run = not (resume and self.has_checkpoint())
        if self.save_to_disk:
            # a run killed while saving left "<file>.tmp<pid>", each as big as a checkpoint
            for stale in remove_stale_temporaries(self.save_dir):
                logger.info("Removed %s, left by a killed save", stale)
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._fresh_run = False

    def _drop_fresh_buffers(self, state: dict) -> dict:
        """``state`` without the buffers of the model's ``fresh_each_run`` modules."""
        fresh = {
            f"{name}.{buf}" if name else buf
            for name, module in self.model.named_modules()
            if getattr(module, "fresh_each_run", False)
            for buf, _ in module.named_buffers(recurse=False)
        }
        dropped = sorted(k for k in state if k in fresh)
        if dropped:
            logger.info(
                "%s: %s not loaded; a new run starts with its own (coarse spec §5.1)",
                self._path,
                ", ".join(dropped),
            )
        return {k: v for k, v in state.items() if k not in fresh}

    def load_weights_file(self, path: str):
        """Load only the model weights of ``path`` (no other checkpointables).

        Returns:
            detectron2's incompatible-keys record (``missing_keys``, ``unexpected_keys``, ...).

        Raises:
            CheckpointError: unsafe, unreadable or unfit file (strict weights).
        """
        return self.load_weights_state(self._load_file(path), path)

    def load_weights_state(self, checkpoint: dict, name: str):
        """As :meth:`load_weights_file` for an already loaded ``{"model": state_dict}``; ``name``
        is the file it came from, used in messages."""
        self._path = name
        incompatible = self._load_model(checkpoint)
        self._log_incompatible_keys(incompatible)
        return incompatible

    def _load_model(self, checkpoint: dict):
        model_keys = set(self.model.state_dict().keys())
        state = checkpoint["model"]
        if _is_detector(model_keys):
            if any(k.startswith(("backbone.image_tower.", "backbone.text_tower.")) for k in state):
                checkpoint["model"] = state = _reroot_coarse(state, model_keys)
                self._coarse_into_detector = True
            elif state and all(str(k).startswith(_DETECTOR_TOWERS) for k in state):
                self._coarse_into_detector = True  # towers only: a converted coarse checkpoint
        if self._fresh_run:
            checkpoint["model"] = self._drop_fresh_buffers(checkpoint["model"])
        checkpoint["model"] = _resize_position_tables(checkpoint["model"], self.model.state_dict())
        if not self.keep_loaded:  # the pre-flight load (keep_loaded) leaves it to the run's load
            _warn_non_finite(checkpoint["model"], self._path)
        incompatible = super()._load_model(checkpoint)
        self._check_missing(incompatible)
        return incompatible

    def _check_missing(self, incompatible) -> None:
        """Raise CheckpointError when too much of the model was left unfilled."""
        params = dict(self.model.named_parameters())
        counted = params
        stage_adds = ""  # what the file lacks because a training stage adds it
        if self._coarse_into_detector and self.inference:
            stage_adds = "a coarse-stage checkpoint has no detector head (FPN, DyHead)"
        elif self._coarse_into_detector:  # FPN, head and output norms are the fine stage's own
            counted = {
                k: p
                for k, p in params.items()
                if k.startswith(_DETECTOR_TOWERS) and not _DETECTOR_OUT_NORM.match(k)
            }
        missing_set = set(incompatible.missing_keys)

        def absent(head: str) -> set:
            """The counted parameters of ``head`` ("prefix." or a full name) if the file has none."""
            keys = {k for k in counted if k == head or (head.endswith(".") and k.startswith(head))}
            return keys if keys and keys <= missing_set else set()

        # a task model's own head (``STAGE_HEADS``), absent as a whole from the file: the head this
        # stage adds on a pre-trained backbone (e.g. VQA on a coarse checkpoint), not a partial
        # load; and a head its evaluation reads (``INFERENCE_HEADS``, e.g. the ITM head of ITM
        # retrieval). Either is refused when the model is used as loaded, however small.
        read_heads = getattr(self.model, "INFERENCE_HEADS", ()) if self.inference else ()
        for head in (*getattr(self.model, "STAGE_HEADS", ()), *read_heads):
            keys = absent(head)
            if keys and self.inference:
                stage_adds = stage_adds or f"the checkpoint has no {head.rstrip('.')} head"
            elif keys:
                counted = {k: p for k, p in counted.items() if k not in keys}
        # a pre-training head the model's losses never read, absent as a whole: the original
        # builds it only for its losses (an ITC retrieval checkpoint has no itm_score, mlm_score)
        for head in getattr(self.model, "heads_not_read", lambda: ())():
            keys = absent(head)
            counted = {k: p for k, p in counted.items() if k not in keys}
        missing = sorted(k for k in missing_set if k in counted)
        if not missing or not counted:
            return
        share_count = len(missing) / len(counted)
        total = sum(p.numel() for p in counted.values())
        share_numel = sum(counted[k].numel() for k in missing) / max(total, 1)
        # a whole missing head is never tolerated when the model is used as loaded
        if max(share_count, share_numel) <= PARTIAL_LOAD_TOLERANCE and not stage_adds:
            return
        what = (
            f"{self._path}: {len(missing)} of {len(counted)} model parameters "
            f"({100 * share_numel:.1f}% of the weights) are not in the checkpoint or have "
            f"another shape: {_groups(missing)}"
        )
        if self._partial_ok():
            logger.warning("%s; loading anyway (MODEL.WEIGHTS_PARTIAL_OK)", what)
            return
        if stage_adds:
            raise CheckpointError(
                f"{what}. {stage_adds[0].upper() + stage_adds[1:]}, which the next training "
                "stage trains: evaluate or predict with that stage's checkpoint. Set "
                "MODEL.WEIGHTS_PARTIAL_OK True to load it anyway."
            )
        raise CheckpointError(
            f"{what}. Is it a checkpoint of another architecture or config? "
            "Set MODEL.WEIGHTS_PARTIAL_OK True to load it anyway."
        )

    def _log_incompatible_keys(self, incompatible) -> None:
        if incompatible.missing_keys:
            logger.info(
                "%d model tensors not in the checkpoint (kept as initialised): %s",
                len(incompatible.missing_keys),
                summarize_keys(incompatible.missing_keys),
            )
        if incompatible.unexpected_keys:
            logger.info(
                "%d checkpoint tensors not used by the model: %s",
                len(incompatible.unexpected_keys),
                summarize_keys(incompatible.unexpected_keys),
            )
        for key, shape_ckpt, shape_model in incompatible.incorrect_shapes:
            logger.warning(
                "Skipped %s: checkpoint shape %s, model shape %s", key, shape_ckpt, shape_model
            )


def load_model_weights(model: torch.nn.Module, cfg, *, inference: bool = True) -> None:
    """Load ``cfg.MODEL.WEIGHTS`` into ``model`` (the predictor's and the demo's loading line).

    Args:
        model: a built model.
        cfg: its config; ``MODEL.WEIGHTS_PARTIAL_OK`` decides on partial checkpoints.
        inference: the model is used as loaded (see :class:`FIBERCheckpointer`); False when
            something is trained on top of it.

    Raises:
        CheckpointError: missing, unsafe or unfit file (one line naming it).
    """
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialisation")
        return
    if "://" not in weights and not os.path.isfile(weights):
        raise CheckpointError(f"MODEL.WEIGHTS file not found: {weights}")
    FIBERCheckpointer(model, partial_ok=cfg.MODEL.WEIGHTS_PARTIAL_OK, inference=inference).load(
        weights
    )


def _last_checkpoint_name(output_dir: str) -> str | None:
    """What ``output_dir/last_checkpoint`` (detectron2's pointer to the newest save) names; None
    without the file."""
    last = os.path.join(output_dir, "last_checkpoint")
    if not os.path.isfile(last):
        return None
    with open(last) as f:
        return f.read().strip()


def final_is_current(output_dir: str, prefix: str = "model") -> bool:
    """Whether ``output_dir/<prefix>_final.pth`` is the last checkpoint its run saved (what
    ``last_checkpoint`` names), not a file left by an earlier run that a later run, started over
    in the same folder, has not yet replaced."""
    final = f"{prefix}_final.pth"
    if not os.path.isfile(os.path.join(output_dir, final)):
        return False
    name = _last_checkpoint_name(output_dir)
    return name is None or name == final  # no pointer: nothing newer was saved


def run_finished(output_dir: str) -> bool:
    """Whether the training run in ``output_dir`` finished: its ``model_final.pth`` is current
    (:func:`final_is_current`) and its final evaluation (``results.json``) was written after it."""
    results = os.path.join(output_dir, "results.json")
    final = os.path.join(output_dir, "model_final.pth")
    return (
        final_is_current(output_dir)
        and os.path.isfile(results)
        and os.path.getmtime(results) >= os.path.getmtime(final)
    )


def weights_to_load(cfg, *, resume: bool) -> str:
    """The file a run will load: the last checkpoint of ``OUTPUT_DIR`` when resuming and one
    exists (as detectron2's ``resume_or_load``), else ``MODEL.WEIGHTS`` ("" for none)."""
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    name = _last_checkpoint_name(cfg.OUTPUT_DIR) if resume else None
    if name is not None:
        if not name:  # written by a run killed mid-write before saves were whole-file
            saved = sorted(
                glob.glob(os.path.join(cfg.OUTPUT_DIR, "model_*.pth")), key=os.path.getmtime
            )
            newest = (
                f"; the newest checkpoint there is {os.path.basename(saved[-1])}" if saved else ""
            )
            raise CheckpointError(
                f"{last} is empty: write the name of the checkpoint to resume from in it, or delete "
                f"it to start from MODEL.WEIGHTS{newest}"
            )
        return os.path.join(cfg.OUTPUT_DIR, name)
    return cfg.MODEL.WEIGHTS


def _warn_non_finite(state: dict, name: str) -> None:
    """Warn when floating-point tensors of a state dict hold NaN or infinite values (a diverged
    run's weights): the model would load them and predict nothing, without a word."""
    bad = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and v.device.type != "meta"
        and not bool(torch.isfinite(v).all())
    ]
    if bad:
        logger.warning(
            "%s: %d of %d tensors hold NaN or infinite values (first: %s); the model will not "
            "predict anything useful with them",
            name,
            len(bad),
            len(state),
            bad[0],
        )


def check_weights_before_run(cfg, *, resume: bool, inference: bool = False) -> None:
    """Read and check the weights a run will load before it writes anything to ``OUTPUT_DIR``.

    The file is read safely and loaded into the model built on the meta device (no memory for
    weights), so an unsafe, unreadable or unfit file (strict weights) is a one-line error before
    any file is touched. The file read here is handed to the run's own load of it (not read twice).

    Args:
        cfg: the run's config (``MODEL.WEIGHTS``, ``OUTPUT_DIR``, ``MODEL.WEIGHTS_PARTIAL_OK``).
        resume: the run continues from ``OUTPUT_DIR``'s last checkpoint when there is one.
        inference: the run evaluates the loaded model (``--eval-only``): there must be weights
            to load, and a head that training would add must be in the file (see
            :class:`FIBERCheckpointer`).

    Raises:
        CheckpointError: one line naming the file.
    """
    path = weights_to_load(cfg, resume=resume)
    if not path:
        if inference and not cfg.MODEL.WEIGHTS_PARTIAL_OK:
            raise CheckpointError(
                "--eval-only without weights would score a randomly initialised model: set "
                "MODEL.WEIGHTS (or --resume with a checkpoint in OUTPUT_DIR); "
                "MODEL.WEIGHTS_PARTIAL_OK True evaluates it anyway"
            )
        return
    if "://" not in path and not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    from detectron2.modeling import build_model

    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "meta"
    meta_cfg.MODEL.SWIN.WEIGHTS = ""
    meta_cfg.MODEL.LANGUAGE_BACKBONE.WEIGHTS = ""
    try:
        with torch.device("meta"):
            model = build_model(meta_cfg)
    except Exception as e:  # noqa: BLE001 - the run's own load still checks everything
        logger.info("pre-flight: cannot build the model on the meta device (%s)", one_line(e))
        _PRELOADED.clear()
        local = os.path.abspath(path)
        if os.path.isfile(local):
            _PRELOADED[local] = (_signature(local), load_checkpoint_file(local))
        return
    checkpointer = FIBERCheckpointer(
        model, partial_ok=cfg.MODEL.WEIGHTS_PARTIAL_OK, inference=inference
    )
    checkpointer.keep_loaded = True
    with warnings.catch_warnings():
        # Copying into meta tensors is a no-op by design here (only keys and shapes are checked);
        # torch warns once per tensor about it, a few hundred lines on every run with weights.
        warnings.filterwarnings("ignore", message=META_COPY_WARNING, category=UserWarning)
        checkpointer.load(path, checkpointables=[])
