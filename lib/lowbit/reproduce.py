"""Run notebooks in order with papermill, printing one line per notebook with its wall time.

At the default profile each notebook is executed in place (its committed outputs regenerated).
At any other profile (``--profile`` or ``$LOWBIT_PROFILE``) the executed notebook is written
beside that run's figures and caches (``$LOWBIT_OUTPUT_DIR`` or the per-run folder of
:func:`lowbit.profiles.run_folder`), so the committed notebook is left as it is.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import profiles
from .paths import project_root


def executed_path(nb: Path, profile: str | None) -> Path:
    """Where the executed copy of ``nb`` goes: ``nb`` itself for the default run, else the run's folder."""
    defaults = profiles.notebook_defaults(nb.stem)
    default_profile = defaults.pop("profile", "default")
    chosen = os.environ.get("LOWBIT_PROFILE") or profile or default_profile
    folder = profiles.run_folder(nb.stem, chosen, defaults)
    if folder is None:
        return nb
    env = os.environ.get("LOWBIT_OUTPUT_DIR")
    out = Path(env) if env else folder
    out.mkdir(parents=True, exist_ok=True)
    return out / nb.name


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def run_notebooks(paths, profile: str | None = None) -> float:
    """Execute each notebook (in place at the default profile); returns the total seconds."""
    import papermill as pm

    total = 0.0
    root = project_root()
    for nb in paths:
        nb = Path(nb)
        if not nb.is_absolute():
            nb = root / nb
        params = {"profile": profile} if profile else {}
        target = executed_path(nb, profile)
        t0 = time.time()
        # papermill records the paths it is given in the notebook's metadata: give them relative
        # to the project root (run from there), never as this machine's absolute paths
        here = Path.cwd()
        os.chdir(root)
        try:
            pm.execute_notebook(_relative(nb, root), _relative(target, root), parameters=params,
                                kernel_name="python3", cwd=str(nb.parent), progress_bar=False)
        finally:
            os.chdir(here)
        dt = time.time() - t0
        total += dt
        where = "" if target == nb else f"  -> {target}"
        print(f"{nb.name:48s} {dt:8.1f} s{where}", flush=True)
    print(f"{'total':48s} {total:8.1f} s", flush=True)
    return total


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lowbit.reproduce")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--profile", default=None, choices=profiles.PROFILES,
                   help="smoke | default | paper (default: the notebook's own)")
    a = p.parse_args(argv)
    run_notebooks(a.notebooks, a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
