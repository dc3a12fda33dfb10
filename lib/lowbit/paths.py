"""Project paths, all derived from the project root (never absolute machine paths).

``LOWBIT_OUTPUT_DIR`` redirects everything a run *writes* (figures, derived caches) to
another folder: the test-suite uses it so that ``make test`` leaves the committed
``figures/`` and ``data/derived/`` untouched.
"""
from __future__ import annotations

import os
from pathlib import Path


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


def _output_base() -> Path | None:
    env = os.environ.get("LOWBIT_OUTPUT_DIR")
    return Path(env).resolve() if env else None


def raw_dir() -> Path:
    """``data/raw``: fetched data sets (git-ignored)."""
    return project_root() / "data" / "raw"


def models_dir() -> Path:
    """``data/models``: committed FP checkpoints and their metadata."""
    return project_root() / "data" / "models"


def derived_dir() -> Path:
    """``data/derived`` (or ``$LOWBIT_OUTPUT_DIR/derived``): cached results."""
    base = _output_base()
    path = base / "derived" if base else project_root() / "data" / "derived"
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir() -> Path:
    """``figures`` (or ``$LOWBIT_OUTPUT_DIR/figures``): generated figures and tables."""
    base = _output_base()
    path = base / "figures" if base else project_root() / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path
