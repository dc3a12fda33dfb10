"""Paths: the project root, the write folder and the read-through order of the caches."""
import pytest

from lowbit import paths


@pytest.fixture
def root(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setenv("LOWBIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LOWBIT_OUTPUT_DIR", raising=False)
    monkeypatch.setattr(paths, "_RUN_OUTPUT", None)
    return tmp_path


def test_project_root_is_the_repository():
    root = paths.project_root()
    assert (root / "pyproject.toml").exists() and (root / "lib" / "lowbit" / "paths.py").exists()


def test_committed_folders_by_default(root):
    assert paths.project_root() == root
    assert paths.output_dir() is None
    assert paths.derived_dir() == root / "data" / "derived" and paths.derived_dir().is_dir()
    assert paths.figures_dir() == root / "figures" and paths.figures_dir().is_dir()
    assert paths.derived_read_dirs() == [root / "data" / "derived"]
    assert paths.models_dir() == root / "data" / "models" and paths.raw_dir() == root / "data" / "raw"


def test_output_dir_redirects_writes_but_reads_fall_back(root, monkeypatch):
    out = root / "elsewhere"
    monkeypatch.setenv("LOWBIT_OUTPUT_DIR", str(out))
    assert paths.derived_dir() == out / "derived"
    assert paths.figures_dir() == out / "figures"
    assert paths.derived_read_dirs() == [out / "derived", root / "data" / "derived"]
    assert paths.committed_derived_dir() == root / "data" / "derived"
    assert paths.committed_figures_dir() == root / "figures"


def test_run_output_and_env_precedence(root, monkeypatch):
    paths.set_run_output(root / "runs" / "r1")
    assert paths.output_dir() == root / "runs" / "r1"
    assert paths.derived_read_dirs() == [root / "runs" / "r1" / "derived", root / "data" / "derived"]
    monkeypatch.setenv("LOWBIT_OUTPUT_DIR", str(root / "env"))
    assert paths.output_dir() == root / "env"  # the environment wins
    monkeypatch.delenv("LOWBIT_OUTPUT_DIR")
    paths.set_run_output(None)
    assert paths.figures_dir() == root / "figures"
