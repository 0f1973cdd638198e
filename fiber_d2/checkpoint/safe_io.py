"""Reading and writing checkpoint files without running code from them.

Formats read (by file name):

* ``.safetensors``: safetensors (tensors only; fiber_d2's provenance, if any, in the metadata);
* ``.pkl``: detectron2 / Detectron model-zoo pickles through a restricted unpickler that rebuilds
  only numpy arrays, dicts, lists, tuples, strings and scalars; any other object in the file is a
  :class:`CheckpointError` naming the file and the object, raised before it is built;
* anything else (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ...): ``torch.load(weights_only=True)``
  (tensors and plain containers only).

Every failure is one :class:`CheckpointError` line naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "SAFE_FORMATS",
    "load_checkpoint_file",
    "save_checkpoint_file",
    "one_line",
    "remove_stale_temporaries",
    "replacing",
    "torch_load_error",
    "write_whole",
]

logger = logging.getLogger(__name__)

SAFE_FORMATS = ".pth/.pt/.bin/.ckpt (torch weights_only), .safetensors, .pkl (numpy arrays only)"

# safetensors metadata entry holding fiber_d2's provenance dict as JSON.
PROVENANCE_KEY = "__fiber_d2__"


class CheckpointError(ValueError):
    """A one-line, user-facing error about a checkpoint file (unsafe, unreadable or unfit)."""


def one_line(error: BaseException) -> str:
    """The first meaningful line of an exception's message (no traceback text).

    An exception re-raised from a data-loader worker carries the worker's traceback in its message;
    the last line there is ``<type>: <message>`` of the original error, which is what is returned.
    """
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in str(error):
        last = lines[-1]
        head, sep, tail = last.partition(": ")
        return tail if sep and head.rsplit(".", 1)[-1] == type(error).__name__ else last
    return lines[0]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it for ``bytes`` (text -> bytes only)."""
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise pickle.UnpicklingError("_codecs.encode with non-text arguments")
    return text.encode(encoding)


_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array rebuild function
_SCALAR = np.float32(0).__reduce__()[0]  # numpy's scalar rebuild function
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _RECONSTRUCT
    _ALLOWED[(_module, "scalar")] = _SCALAR
for _name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool_"):
    _ALLOWED[("numpy", _name)] = getattr(np, _name)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds containers, strings, numbers and numpy arrays / scalars; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name}") from None

    def persistent_load(self, pid) -> Any:
        raise pickle.UnpicklingError(f"persistent id {pid!r}")


def _load_pkl(path: str) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds {e}, not only numpy arrays and plain containers "
            f"(.pkl files are restricted; safe formats: {SAFE_FORMATS})"
        ) from None
    except Exception as e:  # noqa: BLE001 - a corrupt file: one line naming it
        raise CheckpointError(f"cannot read {path} as a .pkl checkpoint: {one_line(e)}") from None


def _load_safetensors(path: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - corrupt / not a safetensors file
        raise CheckpointError(f"cannot read {path} as safetensors: {one_line(e)}") from None
    out: dict = {"model": state}
    if PROVENANCE_KEY in metadata:
        try:
            out[PROVENANCE_KEY] = json.loads(metadata[PROVENANCE_KEY])
        except ValueError:
            out[PROVENANCE_KEY] = metadata[PROVENANCE_KEY]
    return out


def load_checkpoint_file(path: str) -> Any:
    """Read a checkpoint file safely (see the module docstring for the formats).

    Args:
        path: local file.

    Returns:
        what the file holds: a dict (``.safetensors``: ``{"model": state_dict}``).

    Raises:
        CheckpointError: missing, unreadable or unsafe file (one line naming it).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    if path.endswith(".pkl"):
        return _load_pkl(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refusals and corrupt files alike
        raise CheckpointError(torch_load_error(path, e)) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def torch_load_error(path: str, error: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: the refused global when that is
    the cause (torch's own message spans many lines and suggests unsafe loading)."""
    text = _ANSI.sub("", str(error))
    # torch's two wordings: "Unsupported global: GLOBAL X" (not allow-listed) and "Trying to load
    # unsupported GLOBAL X whose module Y is blocked" (os.system and the like)
    refused = re.search(r"unsupported (?:global: )?GLOBAL ([^\s,]+)", text, re.IGNORECASE)
    if refused:
        return (
            f"refusing to load {path}: it holds {refused.group(1)}, not only tensors and plain "
            f"containers (torch.load weights_only=True; safe formats: {SAFE_FORMATS})"
        )
    # any other refusal of torch's restricted unpickler (a corrupt file, or not a checkpoint):
    # its detail, without the advice to load it unrestricted that heads torch's message
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if unpickler:
        return (
            f"cannot load {path} with torch.load(weights_only=True): not a readable checkpoint "
            f"(corrupt, or another kind of file; the unpickler: {unpickler.group(1).strip()})"
        )
    reason = (text.strip().splitlines() or [type(error).__name__])[0]
    kind = _file_kind(path)
    if kind:
        reason = f"{kind} ({reason})"
    return f"cannot load {path} with torch.load(weights_only=True): {reason}"


def _file_kind(path: str) -> str:
    """What a file that torch could not load looks like, from its first bytes ("" if unknown):
    torch writes a zip archive (a legacy file starts as a pickle)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0, os.SEEK_END)
            size = f.tell()
    except OSError:
        return ""
    if head.startswith(b"PK"):
        return f"a truncated or damaged torch zip archive ({size} bytes)"
    if head[:1] != b"\x80":
        return "not a torch checkpoint (neither torch's zip format nor a pickle)"
    return ""


@contextlib.contextmanager
def replacing(path: str):
    """A temporary path beside ``path`` (``<path>.tmp<pid>``) that replaces ``path``
    (``os.replace``, atomic within a folder) when the block ends without an error; an error removes
    it. A process killed while writing leaves ``path`` as it was (absent, or the previous whole
    file) and at most a stray temporary file; writers in other processes do not collide."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_TEMPORARY = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporary files (:func:`replacing`) that killed writers left in ``folder`` and
    its subfolders (e.g. ``inference/``): those whose writing process no longer runs on this
    machine. A live writer's file is kept.

    Args:
        folder: the folder (e.g. a run's ``OUTPUT_DIR``); missing is fine.

    Returns:
        the paths removed.
    """
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            match = _TEMPORARY.match(name)
            path = os.path.join(root, name)
            if match is None or os.path.islink(path):
                continue
            pid = int(match["pid"])
            if pid == os.getpid() or _process_runs(pid):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a pid out of range
        return True
    return True


@contextlib.contextmanager
def write_whole(path: str, mode: str = "wb", encoding: str | None = None):
    """Open ``path`` for writing so that it appears whole or not at all (:func:`replacing`; the data
    are synced before the rename)."""
    with replacing(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def save_checkpoint_file(path: str, state_dict: dict, provenance: dict | None = None) -> None:
    """Write a state dict as ``.safetensors`` (by name) or ``{"model": ..., "__fiber_d2__": ...}``
    with ``torch.save``; written whole or not at all (:func:`replacing`).

    Args:
        path: output file.
        state_dict: name -> tensor.
        provenance: optional JSON-serialisable dict stored with the weights.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        metadata = {PROVENANCE_KEY: json.dumps(provenance)} if provenance is not None else None
        tensors, storages = {}, set()
        for k, v in state_dict.items():  # safetensors refuses tensors that share memory
            ptr = v.untyped_storage().data_ptr()
            tensors[k] = v.clone().contiguous() if ptr in storages else v.contiguous()
            storages.add(ptr)
        with replacing(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    else:
        payload: dict = {"model": state_dict}
        if provenance is not None:
            payload[PROVENANCE_KEY] = provenance
        with write_whole(path) as f:
            torch.save(payload, f)
