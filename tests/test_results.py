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
