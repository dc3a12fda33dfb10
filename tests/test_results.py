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
