"""Profiles and where a run writes: only the default profile with default parameters writes the
committed figures/ and data/derived/; any other run goes to $LOWBIT_OUTPUT_DIR or a per-run folder."""
import ast
import json

import pytest

from lowbit import paths, plotting, profiles, reproduce


def _notebook(root, stem, params_source, setup_source="x = 1"):
    cells = [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": params_source,
              "outputs": [], "execution_count": None},
             {"cell_type": "code", "metadata": {}, "source": setup_source, "outputs": [], "execution_count": None}]
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (root / "notebooks" / f"{stem}.ipynb").write_text(json.dumps(nb))


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A throw-away project root with one notebook; no LOWBIT_OUTPUT_DIR / LOWBIT_PROFILE."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "lib" / "lowbit").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path, "00-demo", 'profile = "default"  # smoke | default | paper\n'
                                   'n_test = 10000  # test images\npairs = [["lenet5", "mnist"]]\n')
    monkeypatch.setenv("LOWBIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LOWBIT_OUTPUT_DIR", raising=False)
    monkeypatch.delenv("LOWBIT_PROFILE", raising=False)
    monkeypatch.setattr(paths, "_RUN_OUTPUT", None)
    return tmp_path


def test_notebook_defaults_are_the_parameters_cell(root):
    assert profiles.notebook_defaults("00-demo") == {"profile": "default", "n_test": 10000,
                                                     "pairs": [["lenet5", "mnist"]]}
    assert profiles.notebook_defaults("00-demo.ipynb") == profiles.notebook_defaults("00-demo")
    _notebook(root, "01-bad", 'profile = "default"\nn = len([1, 2])\n')
    with pytest.raises(ValueError, match="plain literal"):
        profiles.notebook_defaults("01-bad")
    _notebook(root, "02-bad", 'profile = "default"\nimport os\n')
    with pytest.raises(ValueError, match="name = literal"):
        profiles.notebook_defaults("02-bad")
    with pytest.raises(ValueError, match="no notebook"):
        profiles.notebook_defaults("99-missing")


def test_default_run_writes_the_committed_folders(root, capsys):
    assert profiles.resolve("default", notebook="00-demo", n_test=10000, pairs=[("lenet5", "mnist")]) == "default"
    assert paths.output_dir() is None
    assert paths.figures_dir() == root / "figures"
    assert paths.derived_dir() == root / "data" / "derived"
    plotting.save_table([{"a": 1.0}], "t_default")
    assert (root / "figures" / "t_default.csv").exists()
    assert not (root / "runs").exists()
    assert "non-default" not in capsys.readouterr().out


def test_changed_parameter_writes_a_per_run_folder(root, capsys):
    profiles.resolve("default", notebook="00-demo", n_test=2000, pairs=[["lenet5", "mnist"]])
    run = paths.output_dir()
    assert run.parent == root / "runs" and run.name.startswith("00-demo-default-")
    out = capsys.readouterr().out
    assert "n_test=2000 (default 10000)" in out and f"runs/{run.name}/" in out
    plotting.save_table([{"a": 2.0}], "t_changed")
    assert (run / "figures" / "t_changed.csv").exists()
    assert paths.derived_dir() == run / "derived"
    assert not (root / "figures").exists() and not (root / "data" / "derived").exists()
    # the same parameters give the same folder, other values another one
    assert profiles.run_folder("00-demo", "default", {"n_test": 2000, "pairs": [["lenet5", "mnist"]]}) == run
    assert profiles.run_folder("00-demo", "default", {"n_test": 500, "pairs": [["lenet5", "mnist"]]}) != run
    # back at the defaults in the same process: the committed folders again
    profiles.resolve("default", notebook="00-demo", n_test=10000, pairs=[["lenet5", "mnist"]])
    assert paths.figures_dir() == root / "figures"


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_other_profile_writes_a_per_run_folder(root, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("LOWBIT_PROFILE", "smoke")
    chosen = profiles.resolve("default" if how == "environment" else "smoke", notebook="00-demo",
                              n_test=10000, pairs=[["lenet5", "mnist"]])
    assert chosen == "smoke"
    assert paths.output_dir().parent == root / "runs"
    assert paths.output_dir().name.startswith("00-demo-smoke-")
    assert paths.figures_dir() == paths.output_dir() / "figures"


def test_output_dir_env_wins(root, monkeypatch, tmp_path_factory):
    env = tmp_path_factory.mktemp("out")
    monkeypatch.setenv("LOWBIT_OUTPUT_DIR", str(env))
    for n_test in (10000, 2000):
        profiles.resolve("default", notebook="00-demo", n_test=n_test, pairs=[["lenet5", "mnist"]])
        assert paths.figures_dir() == env / "figures" and paths.derived_dir() == env / "derived"
    assert not (root / "runs").exists()


def test_every_knob_must_be_passed_and_known(root):
    with pytest.raises(TypeError, match="pairs=pairs"):
        profiles.resolve("default", notebook="00-demo", n_test=10000)
    with pytest.raises(TypeError, match="not in the parameters cell"):
        profiles.resolve("default", notebook="00-demo", n_test=10000, pairs=[], seed=1)
    with pytest.raises(TypeError, match="without notebook"):
        profiles.resolve("default", n_test=10000)
    with pytest.raises(ValueError, match="unknown profile"):
        profiles.resolve("huge", notebook="00-demo", n_test=10000, pairs=[])


def test_old_call_still_works_and_leaves_the_output_alone(root, monkeypatch):
    paths.set_run_output(root / "runs" / "x")
    assert profiles.resolve("default") == "default"
    assert profiles.resolve("paper") == "paper"
    assert paths.output_dir() == root / "runs" / "x"
    monkeypatch.setenv("LOWBIT_PROFILE", "smoke")
    assert profiles.resolve("default") == "smoke"
    assert profiles.pick("smoke", smoke=1, default=2, paper=3) == 1
    monkeypatch.setenv("LOWBIT_PROFILE", "huge")
    with pytest.raises(ValueError, match="unknown profile"):
        profiles.resolve("default")
    with pytest.raises(TypeError, match="missing"):
        profiles.pick("smoke", smoke=1)


def test_reproduce_keeps_the_committed_notebook_for_other_profiles(root, monkeypatch):
    nb = root / "notebooks" / "00-demo.ipynb"
    assert reproduce.executed_path(nb, None) == nb
    assert reproduce.executed_path(nb, "default") == nb
    smoke = reproduce.executed_path(nb, "paper")
    assert smoke == profiles.run_folder("00-demo", "paper", {"n_test": 10000, "pairs": [["lenet5", "mnist"]]}) / nb.name
    monkeypatch.setenv("LOWBIT_PROFILE", "smoke")
    assert reproduce.executed_path(nb, None).parent.name.startswith("00-demo-smoke-")


def _resolve_calls(nb_path):
    """The keyword names of every ``profiles.resolve(..., notebook=...)`` call in a notebook's code."""
    calls = []
    for cell in json.loads(nb_path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "\n".join(l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "resolve":
                kw = {k.arg: k.value for k in node.keywords}
                if "notebook" in kw:
                    calls.append((ast.literal_eval(kw.pop("notebook")), set(kw)))
    return calls


def test_notebooks_pass_every_knob_to_resolve():
    """Every notebook calls resolve(profile, notebook=<its stem>, <all its knobs>), so that only its
    default run writes the committed folders; papermill sees the same knobs (`--help-notebook`)."""
    import papermill

    nb_dir = paths.project_root() / "notebooks"
    notebooks = sorted(nb_dir.glob("[0-9][0-9]-*.ipynb"))
    assert len(notebooks) >= 6
    without = [nb.name for nb in notebooks if not _resolve_calls(nb)]
    assert not without, f"{without} do not call profiles.resolve(profile, notebook=..., knobs...)"
    for nb in notebooks:
        defaults = profiles.notebook_defaults(nb.stem)
        missing = sorted(set(defaults) - set(papermill.inspect_notebook(str(nb))))
        assert not missing, (f"`papermill --help-notebook {nb.name}` does not list {missing}: papermill skips a "
                             "parameters line holding more than one '=' (write no '=' in its comment)")
        for stem, knobs in _resolve_calls(nb):
            assert stem == nb.stem, f"{nb.name} calls resolve(notebook={stem!r})"
            assert knobs == set(defaults) - {"profile"}, f"{nb.name}: resolve() knobs {sorted(knobs)}"


def test_reproduce_records_paths_relative_to_the_project_root(root, monkeypatch, tmp_path_factory):
    """papermill writes the paths it is given into the notebook's metadata: they must not be
    this machine's absolute paths (the committed notebooks would carry them)."""
    import papermill

    calls = []
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda i, o, **k: calls.append((i, o, __import__("os").getcwd(), k["parameters"])))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    reproduce.run_notebooks(["notebooks/00-demo.ipynb"])
    reproduce.run_notebooks(["notebooks/00-demo.ipynb"], profile="smoke")
    assert calls[0] == ("notebooks/00-demo.ipynb", "notebooks/00-demo.ipynb", str(root), {})
    smoke_out = calls[1][1]
    assert smoke_out.startswith("runs/00-demo-smoke-") and smoke_out.endswith("/00-demo.ipynb")
    assert calls[1][3] == {"profile": "smoke"}
