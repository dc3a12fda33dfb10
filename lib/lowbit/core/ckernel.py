"""Build and load a C kernel that ships as package data: compile once, cache by content, call via ctypes.

One mechanism for every compiled CPU kernel in lowbit (SQ's exact QPS search, nuLSQ's quantizer).
A source is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) into a per-user cache
folder (``$LOWBIT_KERNEL_DIR``, default ``<tmp>/lowbit-kernels-<uid>``) under a tag that hashes the
source's bytes, the compiler and the flags (:func:`cache_tag`), so an edited source is rebuilt; the
library is called through ``ctypes``, which releases the GIL. Plain C99 without fast-math or FMA
contraction: every operation rounds as numpy's and torch's elementwise CPU operations do. Without a
compiler :func:`load_library` returns ``None`` and the caller uses its torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

BASE_FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
# this CPU's instruction set first (still no FMA contraction), else portable code
FLAG_SETS = (BASE_FLAGS + ("-march=native",), BASE_FLAGS)

_LOCK = threading.Lock()


def cache_tag(source: bytes, compiler: str, flags) -> str:
    """16 hex digits of SHA-256 over the C source's bytes, the compiler and the flags."""
    h = hashlib.sha256(source)
    h.update(b"\0" + os.path.basename(compiler).encode() + b"\0" + " ".join(flags).encode())
    return h.hexdigest()[:16]


def kernel_dir() -> Path:
    """The folder of compiled kernels: ``$LOWBIT_KERNEL_DIR`` or a per-user temporary folder."""
    default = Path(tempfile.gettempdir()) / f"lowbit-kernels-{os.getuid()}"
    return Path(os.environ.get("LOWBIT_KERNEL_DIR", default))


def compiler() -> str | None:
    """``$CC``, else ``cc`` or ``gcc`` on the PATH, else ``None``."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(cc: str, flags, source: bytes, prefix: str) -> Path:
    """The shared library ``<prefix>_<tag>.so`` of ``source`` built with ``cc`` and ``flags``,
    compiled unless the cache already holds it. Raises ``OSError`` or ``subprocess.SubprocessError``
    when the compiler fails."""
    folder = kernel_dir()
    lib = folder / f"{prefix}_{cache_tag(source, cc, flags)}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{lib.stem}.{os.getpid()}.{threading.get_ident()}"
    src, tmp = folder / f"{stem}.c", folder / f".{stem}.so"
    src.write_bytes(source)  # compile exactly the bytes that were hashed
    try:
        subprocess.run([cc, *flags, str(src), "-o", str(tmp), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, lib)  # atomic: concurrent builders of the same tag agree
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return lib


def load_library(source: Path, prefix: str, declare, extra_flags=()):
    """``declare(ctypes.CDLL(...))`` of ``source`` built with the first of :data:`FLAG_SETS` (each
    followed by ``extra_flags``) that compiles, or ``None`` when there is no compiler or every build
    fails."""
    cc = compiler()
    if not cc:
        return None
    with _LOCK:
        for flags in FLAG_SETS:
            try:
                return declare(ctypes.CDLL(str(build(cc, tuple(flags) + tuple(extra_flags), source.read_bytes(), prefix))))
            except (OSError, subprocess.SubprocessError):
                continue
    return None
