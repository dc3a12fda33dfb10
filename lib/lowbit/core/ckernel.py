"""Build and load a C kernel that ships as package data: compile once, cache by content, call via ctypes.

One mechanism for every compiled CPU kernel in lowbit (SQ's exact QPS search and refinement, nuLSQ's
quantizer, STLQ's words and scale fit).
A source is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) into a per-user cache
folder (``$LOWBIT_KERNEL_DIR``, default ``<tmp>/lowbit-kernels-<uid>``) under a tag that hashes the
source's bytes, the compiler and the flags (:func:`cache_tag`), so an edited source is rebuilt; the
library is called through ``ctypes``, which releases the GIL. Plain C99 without fast-math or FMA
contraction: every operation rounds as numpy's and torch's elementwise CPU operations do. Without a
compiler :func:`load_library` returns ``None`` and the caller uses its torch path. Each kernel module
holds one :class:`Library` (built at first use, once per process) and passes tensors by
:func:`tensor_ptr`.
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

import torch

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


class Library:
    """The ctypes library of one C source, built and loaded at first use, once per process even when
    several threads ask at once: :func:`load_library`'s result, or ``None`` (no compiler, or every build
    failed; remembered, so the build is tried once)."""

    def __init__(self, source: Path, prefix: str, declare, extra_flags=()):
        self.source, self.prefix, self.declare, self.extra_flags = Path(source), prefix, declare, tuple(extra_flags)
        self._lib = None  # None: not tried yet; False: no compiler / build failed; else the ctypes library
        self._lock = threading.Lock()

    def get(self):
        """The loaded library, or ``None``."""
        with self._lock:
            if self._lib is None:
                self._lib = load_library(self.source, self.prefix, self.declare, self.extra_flags) or False
        return self._lib or None


BACKENDS = ("auto", "kernel", "torch")  # the choice every function with a compiled fast path takes


def check_backend(backend) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else our ``ValueError`` listing them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_kernel(backend: str, usable, needs: str) -> bool:
    """Whether a call with ``backend`` (one of :data:`BACKENDS`) runs its compiled kernel: ``"kernel"``
    always (a ``ValueError`` saying what it ``needs`` when ``usable()`` is false), ``"auto"`` when
    ``usable()``, ``"torch"`` never (``usable`` is not called: the kernel is not even built)."""
    if check_backend(backend) == "torch":
        return False
    on_kernel = bool(usable())
    if backend == "kernel" and not on_kernel:
        raise ValueError(f"backend='kernel' needs {needs}: use backend='auto' or 'torch'")
    return on_kernel


_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double, torch.int32: ctypes.c_int32,
           torch.int64: ctypes.c_int64, torch.int8: ctypes.c_int8, torch.uint8: ctypes.c_uint8,
           torch.bool: ctypes.c_uint8}


def tensor_ptr(t: torch.Tensor, offset: int = 0):
    """A ctypes pointer of ``t``'s element type to its element ``offset`` (``t`` contiguous, on the CPU)."""
    if t.dtype not in _CTYPES:
        raise TypeError(f"no C element type for {t.dtype}: use one of {sorted(map(str, _CTYPES))}")
    return ctypes.cast(t.data_ptr() + offset * t.element_size(), ctypes.POINTER(_CTYPES[t.dtype]))
