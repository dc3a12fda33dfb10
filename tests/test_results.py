"""Result cache: atomic writes, corruption detection, FORCE, read-through to the committed caches."""
import json
import os

import pytest

from lowbit import results


def test_cache_roundtrip_and_key(out_dir):
    calls = []

    def compute():
        calls.append(1)
        return {"acc": 91.5, "xs": [1, 2]}

    cfg = {"model": "lenet5", "bits": 4}
    assert results.cached("t", cfg, compute) == {"acc": 91.5, "xs": [1, 2]}
    assert results.cached("t", cfg, compute) == {"acc": 91.5, "xs": [1, 2]}
    assert len(calls) == 1
    results.cached("t", {"model": "lenet5", "bits": 3}, compute)
    assert len(calls) == 2  # another configuration, another key
    results.cached("t", cfg, compute, force=True)
    assert len(calls) == 3


def test_force_env(out_dir, monkeypatch):
    n = []
    results.cached("f", {}, lambda: n.append(1) or 1)
    monkeypatch.setenv("FORCE", "1")
    results.cached("f", {}, lambda: n.append(1) or 1)
    assert len(n) == 2


def test_corrupt_cache_detected_and_recomputed(out_dir):
    path = results.save_result("c", {"a": 1}, {"v": 1.0})
    record = json.loads(path.read_text())
    record["payload"]["v"] = 2.0  # tampered payload, stale checksum
    path.write_text(json.dumps(record))
    with pytest.raises(results.CorruptCacheError, match="checksum"):
        results.load_result("c", {"a": 1})
    with pytest.warns(UserWarning, match="recomputing"):
        assert results.cached("c", {"a": 1}, lambda: {"v": 3.0}) == {"v": 3.0}
    path.write_text('{"payload": ')  # truncated JSON
    with pytest.raises(results.CorruptCacheError, match="unreadable"):
        results.load_result("c", {"a": 1})


def test_interrupted_write_leaves_previous_file(out_dir, monkeypatch):
    path = results.save_result("w", {"k": 0}, {"v": "old"})
    before = path.read_bytes()

    def boom(fd):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        results.save_result("w", {"k": 0}, {"v": "new" * 1000})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_seed_all_reproducible():
    import numpy as np
    import torch

    from lowbit import seed_all

    seed_all(7)
    a = (torch.rand(3), np.random.rand(3))
    seed_all(7)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all()
    with pytest.raises(TypeError):
        seed_all(1.5)


@pytest.fixture
def committed(tmp_path, monkeypatch):
    """A throw-away project root whose data/derived/ plays the committed caches; output elsewhere."""
    from lowbit import paths

    root = tmp_path / "root"
    (root / "data" / "derived").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    monkeypatch.setenv("LOWBIT_ROOT", str(root))
    monkeypatch.delenv("LOWBIT_OUTPUT_DIR", raising=False)
    monkeypatch.setattr(paths, "_RUN_OUTPUT", None)
    path = results.save_result("r", {"a": 1}, {"v": "committed"})  # written while nothing redirects
    assert path.parent == root / "data" / "derived"
    out = tmp_path / "out"
    monkeypatch.setenv("LOWBIT_OUTPUT_DIR", str(out))
    return root / "data" / "derived", out / "derived"


def test_redirected_run_reads_the_committed_cache(committed):
    committed_dir, out_dir = committed
    before = sorted(p.name for p in committed_dir.iterdir())
    calls = []
    assert results.cached("r", {"a": 1}, lambda: calls.append(1) or {"v": "new"}) == {"v": "committed"}
    assert not calls  # warm: not recomputed
    assert results.find_cached("r", {"a": 1}) == committed_dir / results.cache_path("r", {"a": 1}).name
    # a miss is computed and written to the output folder only
    assert results.cached("r", {"a": 2}, lambda: {"v": "fresh"}) == {"v": "fresh"}
    assert (out_dir / results.cache_path("r", {"a": 2}).name).exists()
    assert sorted(p.name for p in committed_dir.iterdir()) == before


def test_output_folder_record_shadows_the_committed_one(committed):
    committed_dir, out_dir = committed
    results.cached("r", {"a": 1}, lambda: {"v": "forced"}, force=True)  # FORCE writes the output folder
    assert results.load_result("r", {"a": 1}) == {"v": "forced"}
    assert results.find_cached("r", {"a": 1}).parent == out_dir
    assert json.loads((committed_dir / results.cache_path("r", {"a": 1}).name).read_text())["payload"] == {
        "v": "committed"}


def test_corrupt_committed_record_is_recomputed_into_the_output_folder(committed):
    committed_dir, out_dir = committed
    path = committed_dir / results.cache_path("r", {"a": 1}).name
    path.write_text(path.read_text().replace("committed", "tampered"))
    with pytest.raises(results.CorruptCacheError):
        results.load_result("r", {"a": 1})
    with pytest.warns(UserWarning, match="recomputing"):
        assert results.cached("r", {"a": 1}, lambda: {"v": "again"}) == {"v": "again"}
    assert results.find_cached("r", {"a": 1}).parent == out_dir


def _flip(path, old: str, new: str):
    """Change the bytes ``old`` -> ``new`` (same length) once in a file, checksum left stale."""
    raw = path.read_bytes()
    assert raw.count(old.encode()) == 1 and len(old) == len(new)
    path.write_bytes(raw.replace(old.encode(), new.encode()))


@pytest.mark.parametrize("old,new", [('"lenet5"', '"lenet6"'),  # config
                                     ("91.25", "91.35"),  # payload
                                     ('"demo"', '"demp"')])  # name
def test_any_changed_byte_of_a_record_is_detected(out_dir, old, new):
    cfg = {"model": "lenet5", "bits": 4}
    path = results.save_result("demo", cfg, {"acc": 91.25})
    assert json.loads(path.read_text())["format"] == results.RECORD_FORMAT
    _flip(path, old, new)
    with pytest.raises(results.CorruptCacheError, match="checksum"):
        results.load_result("demo", cfg)


def test_record_stored_under_another_key_is_rejected(out_dir):
    a = results.save_result("k", {"x": 1}, {"v": 1})
    b = results.cache_path("k", {"x": 2})
    b.write_bytes(a.read_bytes())  # a valid record copied under another config's file name
    with pytest.raises(results.CorruptCacheError, match="not what its name says"):
        results.load_result("k", {"x": 2})


def _format1(path, name, config, payload):
    """Write a record the way the format-1 code did (checksum over the payload only)."""
    import hashlib

    record = {"name": name, "config": config, "payload": payload,
              "sha256": hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()}
    path.write_text(json.dumps(record, indent=1, sort_keys=True))


def test_migrate_verifies_then_upgrades_format1_records(out_dir):
    folder = results.derived_dir()
    good = results.cache_path("m", {"i": 1})
    _format1(good, "m", {"i": 1}, {"v": [1.5, 2]})
    bad = results.cache_path("m", {"i": 2})
    _format1(bad, "m", {"i": 2}, {"v": 3})
    _flip(bad, '"v": 3', '"v": 4')  # payload changed after the old checksum was taken
    with pytest.raises(results.CorruptCacheError, match="migrate") as err:
        results.load_result("m", {"i": 1})  # format 1 is not read any more
    import re
    import shlex

    printed = [shlex.split(c) for c in re.findall(r"`([^`]+)`", str(err.value))]
    assert printed == [[".venv/bin/python", "-m", "lowbit.results", "migrate"]]
    assert results.build_parser().parse_args(printed[0][3:]).command == "migrate"
    before_bad = bad.read_bytes()
    report = results.migrate(folder)
    assert results.migrate(good) == {"migrated": 0, "current": 1, "failed": []}  # a file target
    assert report == {"migrated": 1, "current": 0, "failed": [bad.name]}
    assert results.load_result("m", {"i": 1}) == {"v": [1.5, 2]}  # same file name, new format
    assert json.loads(good.read_text())["format"] == 2
    assert bad.read_bytes() == before_bad  # a record that fails is left as it is
    assert results.migrate(folder) == {"migrated": 0, "current": 1, "failed": [bad.name]}


def test_committed_caches_are_current_records():
    """Every committed data/derived record is format 2 and passes its whole-record checksum."""
    import subprocess

    from lowbit import paths

    root = paths.project_root()
    try:
        names = subprocess.run(["git", "ls-files", "data/derived"], cwd=root, capture_output=True, text=True,
                               check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    names = [n for n in names if n.endswith(".json")]
    assert len(names) > 100
    for name in names:
        results.read_record(root / name)


KILLED_WRITE = """
import os, sys
from lowbit import results
os.replace = lambda *a: os._exit(9)  # the process dies between writing and renaming
results.atomic_write_text(sys.argv[1], "new")
"""


def test_make_clean_removes_leftover_temp_files_only(tmp_path):
    import shutil
    import subprocess
    import sys

    from lowbit import paths

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    derived = tmp_path / "data" / "derived"
    derived.mkdir(parents=True)
    target = derived / "sq_run-0123456789abcdef.json"
    target.write_text("old")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], timeout=120)
    assert killed.returncode == 9
    leftover = [p for p in derived.iterdir() if p != target]
    assert len(leftover) == 1 and leftover[0].name.startswith(".sq_run-") and target.read_text() == "old"
    keep = [tmp_path / "figures" / "t.csv", tmp_path / "figures" / "notes.tmp", derived / ".gitkeep",
            tmp_path / "lib" / ".x.tmp"]  # not ours to remove: other names or outside data/figures/bench/runs
    for p in keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    (tmp_path / "runs" / "r" / "figures").mkdir(parents=True)
    run_tmp = tmp_path / "runs" / "r" / "figures" / ".t.png.abc.tmp"
    run_tmp.write_text("")
    assert set(results.temp_files(tmp_path)) == {leftover[0], run_tmp}
    done = subprocess.run(["make", "-s", "-f", str(paths.project_root() / "Makefile"), "-C", str(tmp_path),
                           f"PY={sys.executable}", "clean"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not leftover[0].exists() and not run_tmp.exists()
    assert target.read_text() == "old" and all(p.exists() for p in keep)


def test_records_yields_every_verified_record_and_skips_a_corrupt_one(out_dir):
    good = results.save_result("probe_records", {"k": 1}, {"v": 1})
    bad = results.save_result("probe_records", {"k": 2}, {"v": 2})
    bad.write_text(bad.read_text().replace('"v": 2', '"v": 3'))  # payload changed, checksum not
    got = list(results.records("probe_records"))
    assert [(r["config"], r["payload"]) for r in got] == [({"k": 1}, {"v": 1})]
    assert good.parent.resolve() != (results.project_root() / "data" / "derived").resolve()
