"""Checkpoints of a search run: written atomically, read without running code, checked before use.

Checkpoints are read with torch's weights-only unpickler: a checkpoint can hold tensors and plain data (dicts,
lists, numbers, strings) and nothing else, so reading one never runs code. Version 2 checkpoints carry a
SHA-256 checksum over their whole content (every tensor's dtype, shape and bytes, and every other value), checked
on resume; version 1 checkpoints (no checksum) are still read. Every part of a checkpoint is checked before it
is used (keys, counts, shapes, the settings, which are validated again as if given anew).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import tempfile
import warnings
from typing import List

import torch

from .config import _is_int

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 2  # 2: with a checksum; 1 (no checksum) is still read
READABLE_VERSIONS = (1, 2)
# what every checkpoint holds besides format, version and space ("cuda_rng" and "genotype" are optional)
REQUIRED_KEYS = ("config", "epoch", "model", "alphas", "optimizer", "arch_optimizer", "history", "torch_rng")
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".pt"  # atomic_save's temporaries


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    On any failure (a full disk, Ctrl-C) the temporary is removed and ``path`` keeps its previous content; an
    OSError names ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                torch.save(obj, fh)
            except RuntimeError as exc:  # torch's writer reports a failed write (e.g. a full disk) this way
                if "write" not in str(exc).lower():
                    raise
                raise OSError(f"could not write the checkpoint ({str(exc).strip().splitlines()[0]})") from exc
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        raise


def remove_stale_temporaries(folder: str) -> List[str]:
    """Remove the temporaries a killed :func:`atomic_save` left in ``folder``; returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        path = os.path.join(folder, name)
        if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX) and os.path.isfile(path) \
                and not os.path.islink(path):
            try:
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _feed(h, obj) -> None:
    """Feed ``obj`` to the hash ``h`` in a canonical, type-tagged form (dict items in an order of their own)."""
    if obj is None:
        h.update(b"N;")
    elif isinstance(obj, bool):
        h.update(b"B1;" if obj else b"B0;")
    elif isinstance(obj, int):
        h.update(b"I%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"F" + obj.hex().encode() + b";")
    elif isinstance(obj, complex):
        h.update(b"C" + obj.real.hex().encode() + b"," + obj.imag.hex().encode() + b";")
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d:" % len(data) + data)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"Y%d:" % len(obj) + bytes(obj))
    elif isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_quantized:
            raise TypeError(f"a {obj.layout} tensor")
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(b"X" + str(obj.dtype).encode() + b"[" + ",".join(str(d) for d in obj.shape).encode() + b"]:")
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(b"d" + str(obj).encode() + b";")
    elif isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            kh = hashlib.sha256()
            _feed(kh, k)
            items.append((kh.digest(), v))
        items.sort(key=lambda kv: kv[0])
        h.update(b"D%d:" % len(items))
        for kd, v in items:
            h.update(kd)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"L%d:" if isinstance(obj, list) else b"T%d:") % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (set, frozenset)):
        digests = []
        for v in obj:
            vh = hashlib.sha256()
            _feed(vh, v)
            digests.append(vh.digest())
        h.update(b"E%d:" % len(digests) + b"".join(sorted(digests)))
    else:
        raise TypeError(f"an object of type {type(obj).__name__}")


def checkpoint_checksum(ckpt: dict) -> str:
    """SHA-256 (hex) over everything in a checkpoint but its ``"checksum"``: each tensor's dtype, shape and bytes,
    and every other value, in a canonical order (so it does not depend on dict order or on the device)."""
    h = hashlib.sha256(b"pynas-search-checkpoint\0")
    _feed(h, {k: v for k, v in ckpt.items() if k != "checksum"})
    return h.hexdigest()


def _unpickler_reason(exc: BaseException) -> str:
    """The part of torch's weights-only refusal that says what was refused, on one line."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n\n|$)", text, re.S)
    reason = m.group(1) if m else (text.strip().splitlines() or [type(exc).__name__])[0]
    reason = re.sub(r"\s+", " ", reason).strip()
    return reason[:300]


def load_checkpoint(path: str, fmt: str = "pynas-search", what: str = "resume") -> dict:
    """Read a checkpoint of format ``fmt`` (a file, or a run folder holding ``checkpoint.pt``), safely: torch's
    weights-only unpickler (tensors and plain data only, no code runs), and the checksum of version 2 checkpoints
    verified. ``what`` names the argument in the messages."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on the pickle protocol of a foreign file
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "WeightsUnpickler error" in str(exc):
            raise ValueError(f"{what}: {path} refused: it holds something other than tensors and plain data, and "
                             f"pynas reads checkpoints without running code ({_unpickler_reason(exc)})") from None
        raise ValueError(f"{what}: {path} is not a readable pynas checkpoint ({_unpickler_reason(exc)})") from None
    except Exception as exc:
        raise ValueError(f"{what}: {path} is not a readable pynas checkpoint "
                         f"({type(exc).__name__}: {_unpickler_reason(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt or "config" not in ckpt:
        kind = "search" if fmt == "pynas-search" else "training"
        raise ValueError(f"{what}: {path} is not a pynas {kind} checkpoint")
    version = ckpt.get("version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise ValueError(f"{what}: {path} has checkpoint version {version!r}; this pynas reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 2:
        stored = ckpt.get("checksum")
        if not isinstance(stored, str):
            raise ValueError(f"{what}: {path} (checkpoint version {version}) has no checksum: it was altered or "
                             f"not written by pynas")
        try:
            actual = checkpoint_checksum(ckpt)
        except TypeError as exc:
            raise ValueError(f"{what}: {path} holds {exc}, which no pynas checkpoint holds") from None
        if actual != stored:
            raise ValueError(f"{what}: {path}: checksum mismatch: the checkpoint was changed or damaged after it "
                             f"was written")
    return ckpt


def check_checkpoint_keys(ckpt: dict, where: str, keys=REQUIRED_KEYS) -> None:
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise ValueError(f"resume: {where}: the checkpoint lacks {', '.join(repr(k) for k in missing)}")


def config_from_checkpoint(config_cls, ckpt: dict, where: str):
    """The run's settings from its checkpoint: known keys only (a missing key takes its default, e.g. a setting
    newer than the checkpoint); their values are checked by the search as if given anew."""
    raw = ckpt["config"]
    if not isinstance(raw, dict):
        raise ValueError(f"resume: {where}: the checkpoint's 'config' is not a mapping")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted((k for k in raw if k not in known), key=str)
    if unknown:
        raise ValueError(f"resume: {where}: the checkpoint's config has unknown key(s) "
                         f"{', '.join(repr(k) for k in unknown)} (written by another version of pynas?)")
    return config_cls(**raw)
