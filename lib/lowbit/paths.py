"""Project paths, all derived from the project root (never absolute machine paths).

Where a run *writes* (figures, derived caches) is decided once per process:

1. ``$LOWBIT_OUTPUT_DIR`` if set (the test-suite sets it, so ``make test`` leaves the committed
   ``figures/`` and ``data/derived/`` untouched);
2. else the per-run folder chosen by :func:`lowbit.profiles.resolve` for a run with a
   non-default profile or parameters (``runs/<notebook>-<profile>-<hash>/``, git-ignored);
3. else the committed ``figures/`` and ``data/derived/``.

Reads of cached results look in the output folder first and then fall back to the committed
``data/derived/`` (:func:`derived_read_dirs`), so a redirected run still finds the committed caches.
"""
from __future__ import annotations

import os
from pathlib import Path

_RUN_OUTPUT: Path | None = None  # set by lowbit.profiles.resolve for a non-default run


def project_root() -> Path:
    """The folder holding ``pyproject.toml`` (``LOWBIT_ROOT`` overrides)."""
    env = os.environ.get("LOWBIT_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "lib" / "lowbit").exists():
            return parent
    return Path.cwd()


def set_run_output(path) -> None:
    """Send this process's figures and caches to ``path`` (``None``: the committed folders).

    Called by :func:`lowbit.profiles.resolve`; ``$LOWBIT_OUTPUT_DIR`` still wins over it.
    """
    global _RUN_OUTPUT
    _RUN_OUTPUT = Path(path).resolve() if path is not None else None


def output_dir() -> Path | None:
    """The folder this process writes into, ``None`` when it writes the committed folders."""
    env = os.environ.get("LOWBIT_OUTPUT_DIR")
    if env:
        return Path(env).resolve()
    return _RUN_OUTPUT


def runs_dir() -> Path:
    """``runs``: per-run output folders of non-default runs (git-ignored)."""
    return project_root() / "runs"


def raw_dir() -> Path:
    """``data/raw``: fetched data sets (git-ignored)."""
    return project_root() / "data" / "raw"


def models_dir() -> Path:
    """``data/models``: committed FP checkpoints and their metadata."""
    return project_root() / "data" / "models"


def committed_derived_dir() -> Path:
    """``data/derived``: the committed cached results (whatever the output folder is)."""
    return project_root() / "data" / "derived"


def committed_figures_dir() -> Path:
    """``figures``: the committed figures and tables (whatever the output folder is)."""
    return project_root() / "figures"


def derived_dir() -> Path:
    """Where cached results are written: ``<output>/derived`` or ``data/derived``."""
    base = output_dir()
    path = base / "derived" if base else committed_derived_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def derived_read_dirs() -> list[Path]:
    """Where cached results are looked up, in order: the write folder, then ``data/derived``."""
    dirs = [derived_dir()]
    committed = committed_derived_dir()
    if committed.resolve() != dirs[0].resolve():
        dirs.append(committed)
    return dirs


def figures_dir() -> Path:
    """Where figures and tables are written: ``<output>/figures`` or ``figures``."""
    base = output_dir()
    path = base / "figures" if base else committed_figures_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path
