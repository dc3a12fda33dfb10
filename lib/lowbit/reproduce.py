"""Run notebooks in order with papermill, printing one line per notebook with its wall time."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .paths import project_root


def run_notebooks(paths, profile: str | None = None) -> float:
    """Execute each notebook in place (outputs regenerated); returns the total seconds."""
    import papermill as pm

    total = 0.0
    for nb in paths:
        nb = Path(nb)
        if not nb.is_absolute():
            nb = project_root() / nb
        params = {"profile": profile} if profile else {}
        t0 = time.time()
        pm.execute_notebook(str(nb), str(nb), parameters=params, kernel_name="python3",
                            cwd=str(nb.parent), progress_bar=False)
        dt = time.time() - t0
        total += dt
        print(f"{nb.name:48s} {dt:8.1f} s", flush=True)
    print(f"{'total':48s} {total:8.1f} s", flush=True)
    return total


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lowbit.reproduce")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--profile", default=None, help="smoke | default | paper (default: the notebook's own)")
    a = p.parse_args(argv)
    run_notebooks(a.notebooks, a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
