"""Cached results with atomic writes and corruption detection.

A result is stored as ``<derived>/<name>-<key>.json`` where ``key`` hashes the
configuration. The file is a record ``{"format": 2, "name", "config", "payload", "sha256"}``
whose SHA-256 covers the whole record (format, name, configuration and payload), written to a
temporary file ``.<file>.<random>.tmp`` in the same folder and renamed into place (``os.replace``
is atomic on POSIX), so an interrupted write never leaves a half file. A killed process can leave
the temporary file behind: ``make clean`` (:func:`clean_temp`) removes those and nothing else.
A record whose checksum, name or configuration does not match is reported and recomputed, never
silently used. Records of format 1 (checksum over the payload only) are upgraded once by
``python -m lowbit.results migrate``.

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

from .paths import committed_derived_dir, derived_dir, derived_read_dirs, project_root


RECORD_FORMAT = 2  # 2: the checksum covers format, name, config and payload; 1: payload only
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"  # atomic writes go through .<file name>.<random>.tmp
TEMP_FOLDERS = ("data", "figures", "bench", "runs")  # where clean_temp looks, under the project root


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
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
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


def _record_sha256(record: dict) -> str:
    """SHA-256 of everything in a format-2 record but its ``sha256`` field."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _payload_sha256(payload) -> str:
    """The format-1 checksum: SHA-256 of the payload alone."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def make_record(name: str, config: dict, payload) -> dict:
    """The format-2 record stored for ``payload`` under ``name`` and ``config``."""
    record = {"format": RECORD_FORMAT, "name": name, "config": _to_jsonable(config),
              "payload": _to_jsonable(payload)}
    record["sha256"] = _record_sha256(record)
    return record


def _write_record(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))


def save_result(name: str, config: dict, payload) -> Path:
    """Store ``payload`` (JSON-able) for ``config`` atomically; returns the path."""
    path = cache_path(name, config)
    _write_record(path, make_record(name, config, payload))
    return path


def read_record(path) -> dict:
    """The verified format-2 record in ``path``; :class:`CorruptCacheError` if it is unreadable,
    of another format, fails its checksum or is stored under a file name that is not its key."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        fmt, digest = record.get("format", 1), record["sha256"]
        name, config = record["name"], record["config"]
        record["payload"]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CorruptCacheError(f"cache file {path} is unreadable ({err!r})") from err
    if fmt != RECORD_FORMAT:
        raise CorruptCacheError(f"cache file {path} has record format {fmt!r}, not {RECORD_FORMAT}: upgrade it "
                                "with `.venv/bin/python -m lowbit.results migrate` from the project root")
    if _record_sha256(record) != digest:
        raise CorruptCacheError(f"cache file {path} fails its checksum (name, config or payload changed)")
    if path.name != _file_name(name, config):
        raise CorruptCacheError(f"cache file {path} holds {_file_name(name, config)}, not what its name says")
    return record


def records(name: str):
    """Every verified ``name`` record (output folder first, then ``data/derived/``; a file name seen in
    the first is not read again from the second); corrupt ones are skipped, never used."""
    seen = set()
    for folder in derived_read_dirs():
        for path in sorted(folder.glob(f"{name}-*.json")):
            if path.name in seen:
                continue
            seen.add(path.name)
            try:
                yield read_record(path)
            except CorruptCacheError:
                continue


def load_result(name: str, config: dict):
    """The cached payload (output folder first, then ``data/derived/``), ``None`` if absent;
    :class:`CorruptCacheError` if corrupt."""
    path = find_cached(name, config)
    if path is None:
        return None
    return read_record(path)["payload"]


def force_requested() -> bool:
    """Whether the ``FORCE`` environment variable asks to recompute every cached result (``FORCE=1``)."""
    return os.environ.get("FORCE", "0") not in ("", "0", "false", "False")


def cached(name: str, config: dict, compute: Callable[[], Any], force: bool | None = None):
    """Return the cached result for ``config`` or compute, store and return it.

    ``force=None`` reads the ``FORCE`` environment variable (``FORCE=1`` recomputes).
    A corrupt cache file is reported with a warning and recomputed.
    """
    if force is None:
        force = force_requested()
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


def migrate(*targets) -> dict:
    """Upgrade the format-1 records among ``targets`` (folders of ``*.json`` records or record
    files; default: the committed ``data/derived/``) to format 2, in place under the same file
    names (the key, a hash of the config, is unchanged).

    Each old record's payload checksum and file name are verified first; one that fails is left
    as it is and counted as ``"failed"``. Returns ``{"migrated", "current", "failed": [names]}``.
    """
    files = []
    for target in targets or (committed_derived_dir(),):
        target = Path(target)
        files += sorted(target.glob("*.json")) if target.is_dir() else [target]
    report = {"migrated": 0, "current": 0, "failed": []}
    for path in files:
        try:
            record = json.loads(path.read_text())
            if record.get("format", 1) == RECORD_FORMAT:
                read_record(path)
                report["current"] += 1
                continue
            ok = (_payload_sha256(record["payload"]) == record["sha256"]
                  and path.name == _file_name(record["name"], record["config"]))
        except (CorruptCacheError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            report["failed"].append(path.name)
            continue
        _write_record(path, make_record(record["name"], record["config"], record["payload"]))
        read_record(path)
        report["migrated"] += 1
    return report


def temp_files(root=None) -> list[Path]:
    """Leftover temporary files of interrupted atomic writes (``.<name>.tmp``) under the
    project's ``data/``, ``figures/``, ``bench/`` and ``runs/``."""
    root = Path(root) if root is not None else project_root()
    found = []
    for top in TEMP_FOLDERS:
        if (root / top).is_dir():
            found += [p for p in (root / top).rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}") if p.is_file()]
    return sorted(found)


def clean_temp(root=None) -> list[Path]:
    """Delete :func:`temp_files` (what ``make clean`` calls); returns the removed paths."""
    removed = temp_files(root)
    for path in removed:
        path.unlink()
    return removed


def build_parser():
    """The ``python -m lowbit.results`` command line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lowbit.results", description="maintain the result caches")
    sub = parser.add_subparsers(dest="command", required=True)
    mig = sub.add_parser("migrate", help="upgrade format-1 records to format 2 (whole-record checksum)")
    mig.add_argument("targets", nargs="*", help="record files or folders of them (default: data/derived)")
    cln = sub.add_parser("clean-temp", help="remove leftover .*.tmp files of interrupted writes")
    cln.add_argument("--root", default=None, help="project root (default: this checkout's)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "migrate":
        report = migrate(*args.targets)
        print(f"migrated {report['migrated']}, already format {RECORD_FORMAT}: {report['current']}, "
              f"failed: {len(report['failed'])} {report['failed']}")
        return 1 if report["failed"] else 0
    for path in clean_temp(args.root):
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
