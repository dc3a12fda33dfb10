"""Seeding, devices, wall timing and small helpers shared by the library."""
from __future__ import annotations

import os
import random
import subprocess
import time

import numpy as np
import torch

from .paths import project_root


def timed(fn):
    """``(fn(), seconds)``: the result of calling ``fn`` and its wall time (``time.perf_counter``), for
    the benchmarks in ``bench/`` that time a fast path and its reference in one run."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so the same seed gives the same numbers."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(seed))
    os.environ.setdefault("PYTHONHASHSEED", str(int(seed)))


def default_device() -> torch.device:
    """CUDA when available, else CPU (never hard-coded ``.cuda()``)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def git_commit() -> str:
    """The current commit hash (``"unknown"`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project_root(),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def colophon(profile: str, started: float | None = None) -> str:
    """Package versions, commit, profile and wall time, for a notebook's last cell."""
    import platform

    import matplotlib
    import torchvision

    lines = [
        f"lowbit commit {git_commit()}, profile {profile!r}",
        f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"numpy {np.__version__}, matplotlib {matplotlib.__version__}",
        f"threads {torch.get_num_threads()}, device {default_device()}",
    ]
    if started is not None:
        lines.append(f"wall time {time.time() - started:.1f} s")
    return "\n".join(lines)
