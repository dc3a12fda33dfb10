"""Cached results with atomic writes and corruption detection.

A result is stored as ``<derived>/<name>-<key>.json`` where ``key`` hashes the
configuration. The file holds the configuration, the payload and a SHA-256 of the
payload, written to a temporary file in the same folder and renamed into place
(``os.replace`` is atomic on POSIX), so an interrupted write never leaves a half file.
A file whose checksum does not match is reported and recomputed, never silently used.

Reads look in the output folder first and then in the committed ``data/derived/``
(:func:`lowbit.paths.derived_read_dirs`), so a run redirected by ``$LOWBIT_OUTPUT_DIR`` or a
per-run folder still finds the committed caches; writes go to the output folder only.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .paths import derived_dir, derived_read_dirs


class CorruptCacheError(ValueError):
    """A cache or checkpoint file whose content does not match its checksum."""


def sha256_file(path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_jsonable(obj: Any):
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # torch tensors
        return obj.tolist()
    return obj


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` through a temporary file + rename."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def config_key(config: dict) -> str:
    """A short stable hash of a JSON-able configuration."""
    blob = json.dumps(_to_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_name(name: str, config: dict) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"cache name must be a plain non-empty file stem, got {name!r}")
    return f"{name}-{config_key(config)}.json"


def cache_path(name: str, config: dict) -> Path:
    """Where the result ``name`` for ``config`` is written (the output folder)."""
    return derived_dir() / _file_name(name, config)


def find_cached(name: str, config: dict) -> Path | None:
    """The cached file for ``config``: in the output folder, else in the committed
    ``data/derived/``; ``None`` if neither has it."""
    file_name = _file_name(name, config)
    for folder in derived_read_dirs():
        if (folder / file_name).exists():
            return folder / file_name
    return None


def save_result(name: str, config: dict, payload) -> Path:
    """Store ``payload`` (JSON-able) for ``config`` atomically; returns the path."""
    payload = _to_jsonable(payload)
    body = json.dumps(payload, sort_keys=True)
    record = {
        "name": name,
        "config": _to_jsonable(config),
        "sha256": hashlib.sha256(body.encode()).hexdigest(),
        "payload": payload,
    }
    path = cache_path(name, config)
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
    return path


def load_result(name: str, config: dict):
    """The cached payload (output folder first, then ``data/derived/``), ``None`` if absent;
    :class:`CorruptCacheError` if corrupt."""
    path = find_cached(name, config)
    if path is None:
        return None
    try:
        record = json.loads(path.read_text())
        body = json.dumps(record["payload"], sort_keys=True)
        ok = hashlib.sha256(body.encode()).hexdigest() == record["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CorruptCacheError(f"cache file {path} is unreadable ({err})") from err
    if not ok:
        raise CorruptCacheError(f"cache file {path} fails its checksum")
    return record["payload"]


def cached(name: str, config: dict, compute: Callable[[], Any], force: bool | None = None):
    """Return the cached result for ``config`` or compute, store and return it.

    ``force=None`` reads the ``FORCE`` environment variable (``FORCE=1`` recomputes).
    A corrupt cache file is reported with a warning and recomputed.
    """
    if force is None:
        force = os.environ.get("FORCE", "0") not in ("", "0", "false", "False")
    if not force:
        try:
            payload = load_result(name, config)
        except CorruptCacheError as err:
            warnings.warn(f"{err}; recomputing", stacklevel=2)
            payload = None
        if payload is not None:
            return payload
    payload = _to_jsonable(compute())
    save_result(name, config, payload)
    return payload
