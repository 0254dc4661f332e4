"""vlm_post.fs.atomic_path: the one tmp-file + fsync + rename write that checkpoints, the teacher cache, rollout
files and the study's markers use."""

from __future__ import annotations

import pytest

from vlm_post.fs import atomic_path

pytestmark = pytest.mark.fast


def test_the_new_file_replaces_the_old_and_no_temporary_file_is_left(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing reaches ``path`` before the block ends
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_an_exclusive_write_never_replaces_a_file(tmp_path):
    path = tmp_path / "teacher.json"
    with atomic_path(path, exclusive=True) as tmp:
        tmp.write_text("first")
    with pytest.raises(FileExistsError), atomic_path(path, exclusive=True) as tmp:
        tmp.write_text("second")
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.json"]
