"""Run-size profiles: ``smoke`` (seconds, tests), ``default`` (CPU, `make reproduce`),
``paper`` (the papers' settings, for a GPU box), and where a run writes.

Notebooks keep ``profile = "default"`` and their knobs in the ``parameters`` cell and then call
:func:`resolve` in the setup cell::

    profile = lowbit.profiles.resolve(profile, notebook="00-baselines", n_test=n_test, baselines=baselines)

``$LOWBIT_PROFILE`` (set by the test-suite to ``smoke``) wins over the notebook's profile. Only the
default profile with every knob at its ``parameters``-cell default writes into the committed
``figures/`` and ``data/derived/``; any other run writes to ``$LOWBIT_OUTPUT_DIR`` if set, else to
``runs/<notebook>-<profile>-<hash of the parameters>/`` (git-ignored), and says so.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

from . import paths

PROFILES = ("smoke", "default", "paper")
PAPER_INPUTS = ("data_dir", "weights")  # the parameters-cell knobs a paper profile may need


class PaperInputsMissing(ValueError):
    """The paper profile was asked for without the ImageNet folder or weights it needs. In Jupyter
    the message alone is shown (no traceback): the notebook stops at its setup cell."""

    def _render_traceback_(self):  # IPython's hook: what a failing cell prints
        return [f"PaperInputsMissing: {line}" if i == 0 else line for i, line in enumerate(str(self).splitlines())]


def paper_inputs(notebook: str, profile: str, params: dict, needs=PAPER_INPUTS) -> bool:
    """For the paper profile: check that ``params`` give every input in ``needs`` (``data_dir``: a
    folder with ImageNet's ``train/`` and ``val/`` ImageFolders; ``weights``: ``"DEFAULT"`` or a state
    dict path) and make them this process's ImageNet inputs (:func:`lowbit.imagenet.use`); a
    :class:`PaperInputsMissing` saying exactly what is missing and the command that runs it otherwise.
    ``False`` (nothing done) for the other profiles."""
    if profile != "paper":
        return False
    unknown = sorted(set(needs) - set(PAPER_INPUTS))
    if unknown:
        raise ValueError(f"unknown paper inputs {unknown}: use a subset of {PAPER_INPUTS}")
    missing = [k for k in needs if params.get(k) is None]
    if missing:
        what = {"data_dir": "data_dir: a folder holding ImageNet's train/ and val/ in torchvision's ImageFolder "
                            "layout (one sub-folder per class)",
                "weights": "weights: 'DEFAULT' (torchvision's pretrained weights, downloaded into its cache on a "
                           "connected machine) or the path of a saved state dict"}
        args = " ".join(f"-p {k} {'/path/to/imagenet' if k == 'data_dir' else 'DEFAULT'}" for k in needs)
        stem = notebook_path(notebook).stem
        raise PaperInputsMissing(
            f"profile='paper' runs {stem}'s ImageNet protocol and needs {' and '.join(missing)}, not given:\n"
            + "".join(f"  {what[k]}\n" for k in missing)
            + f"run it as: papermill notebooks/{stem}.ipynb runs/{stem}-paper.ipynb -p profile paper {args}")
    from . import imagenet

    imagenet.use(params.get("data_dir"), params.get("weights"))
    return True


def _check(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {PROFILES}")
    return profile


def notebook_path(notebook: str) -> Path:
    """``notebooks/<notebook>.ipynb`` (``notebook`` with or without the ``.ipynb``)."""
    if not isinstance(notebook, str) or not notebook or "/" in notebook:
        raise ValueError(f"notebook must be a notebook's stem like '00-baselines', got {notebook!r}")
    stem = notebook[:-len(".ipynb")] if notebook.endswith(".ipynb") else notebook
    path = paths.project_root() / "notebooks" / f"{stem}.ipynb"
    if not path.exists():
        raise ValueError(f"no notebook {path}: pass the stem of a file in notebooks/, e.g. '00-baselines'")
    return path


def notebook_defaults(notebook: str) -> dict:
    """The ``name = literal`` assignments of the notebook's cell tagged ``parameters`` (its defaults).

    Parsed with :mod:`ast` and :func:`ast.literal_eval`, so the cell must hold plain literals only.
    """
    path = notebook_path(notebook)
    cells = [c for c in json.loads(path.read_text())["cells"]
             if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name} needs exactly one cell tagged 'parameters', found {len(cells)}")
    source = "".join(cells[0]["source"])
    defaults = {}
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            getattr(node, "target", None) if isinstance(node, ast.AnnAssign) else None
        if not isinstance(target, ast.Name) or node.value is None:
            raise ValueError(f"{path.name}: the parameters cell may only hold `name = literal` lines "
                             f"(line {node.lineno}: {ast.unparse(node)!r})")
        try:
            defaults[target.id] = ast.literal_eval(node.value)
        except ValueError as err:
            raise ValueError(f"{path.name}: parameter {target.id!r} must be a plain literal "
                             f"(line {node.lineno}: {ast.unparse(node.value)!r})") from err
    return defaults


def _plain(value):
    """Tuples as lists (papermill and YAML give lists), recursively, for comparing and hashing."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def run_folder(notebook: str, profile: str, params: dict) -> Path | None:
    """The per-run output folder of a run of ``notebook`` at ``profile`` with ``params``
    (``None`` when it is the default run, which writes the committed folders).

    ``params`` must name every knob of the parameters cell except ``profile``.
    """
    return _plan(notebook, profile, params)[0]


def _plan(notebook: str, profile: str, params: dict) -> tuple[Path | None, list[str]]:
    """(per-run folder or ``None``, what differs from the defaults as ``name=value (default ...)``)."""
    defaults = notebook_defaults(notebook)
    default_profile = defaults.pop("profile", "default")
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise TypeError(f"{unknown} are not in the parameters cell of {notebook}: move every knob there "
                        f"(it has {sorted(defaults)})")
    missing = sorted(set(defaults) - set(params))
    if missing:
        raise TypeError(f"resolve(..., notebook={notebook!r}) needs every knob of its parameters cell: "
                        f"pass {', '.join(f'{m}={m}' for m in missing)}")
    changes = [f"{k}={v!r} (default {defaults[k]!r})" for k, v in sorted(params.items())
               if _plain(v) != _plain(defaults[k])]
    if profile != default_profile:
        changes.insert(0, f"profile={profile!r} (default {default_profile!r})")
    if not changes:
        return None, []
    blob = json.dumps(_plain({"profile": profile, **params}), sort_keys=True, default=repr)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    stem = notebook_path(notebook).stem
    return paths.runs_dir() / f"{stem}-{profile}-{digest}", changes


def resolve(profile: str = "default", notebook: str | None = None, paper_needs=None, **params) -> str:
    """The active profile: ``$LOWBIT_PROFILE`` if set, else ``profile``; validated.

    With ``notebook`` (the notebook's stem) and every knob of its parameters cell as keywords,
    also chooses where this process writes (:func:`lowbit.paths.output_dir`): the committed
    folders for the default run, else ``$LOWBIT_OUTPUT_DIR`` or a per-run folder, printed. At the
    paper profile the ImageNet inputs among the knobs (``data_dir``, ``weights``; ``paper_needs``
    says which the notebook needs, default those its parameters cell has) are checked and set
    (:func:`paper_inputs`) before anything runs.
    """
    chosen = _check(os.environ.get("LOWBIT_PROFILE") or profile)
    if notebook is None:
        if params:
            raise TypeError(f"resolve() got knobs {sorted(params)} without notebook=...: pass the notebook's stem")
        return chosen
    folder, changes = _plan(notebook, chosen, params)
    needs = tuple(k for k in PAPER_INPUTS if k in params) if paper_needs is None else tuple(paper_needs)
    paper_inputs(notebook, chosen, params, needs)
    paths.set_run_output(folder)
    env = os.environ.get("LOWBIT_OUTPUT_DIR")
    if env:
        print(f"writing figures and caches to $LOWBIT_OUTPUT_DIR={env}")
    elif folder is not None:
        root = paths.project_root()
        shown = folder.relative_to(root) if folder.is_relative_to(root) else folder
        print(f"non-default run ({', '.join(changes)}): figures and caches go to {shown}/; "
              "the committed figures/ and data/derived/ are left as they are")
    return chosen


def pick(profile: str, **by_profile):
    """``pick(p, smoke=.., default=.., paper=..)`` -> the value for profile ``p``."""
    _check(profile)
    missing = [p for p in PROFILES if p not in by_profile]
    if missing:
        raise TypeError(f"pick() needs a value for every profile, missing {missing}")
    return by_profile[profile]
