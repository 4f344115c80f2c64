"""trec.io: outputs appear whole under their final name, or not at all, with the usual permissions."""

from __future__ import annotations

import os

import pytest

from trec.io import atomic_directory, atomic_path, atomic_write_json, read_json_object


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_directory_appears_whole_and_readable(tmp_path, umask_022):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        (tmp / "part").write_text("x")
        assert not final.exists()  # nothing under the final name until the block succeeds
    assert (final / "part").read_text() == "x"
    assert final.stat().st_mode & 0o777 == 0o755  # not mkdtemp's owner-only 0o700
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_failure_leaves_nothing_and_keeps_the_old_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_directory(final, overwrite=True) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in final.iterdir()] == ["old"]


def test_atomic_path_renames_on_success_and_removes_on_failure(tmp_path, umask_022):
    target = tmp_path / "shard-0.faiss"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("writer failed")
    assert list(tmp_path.iterdir()) == []

    atomic_write_json(tmp_path / "metrics.json", {"ndcg@10": 0.5})
    assert read_json_object(tmp_path / "metrics.json") == {"ndcg@10": 0.5}
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
