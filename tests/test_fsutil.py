"""Atomic writers: a failed write leaves the old file or folder as it was and no temporary behind."""
import os
import stat

import pytest

from rpo_jax.core import fsutil


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_writes_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with fsutil.atomic_file(target) as f:
        f.write("{}\n")
    with open(tmp_path / "plain", "w") as f:  # what an ordinary open() gives under this umask
        f.write("x")
    assert target.read_text() == "{}\n"
    assert _mode(target) == _mode(tmp_path / "plain")
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_file_error_keeps_old_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with fsutil.atomic_file(target, "wb") as f:
            f.write(b"half of the new")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with pytest.raises(ValueError, match="mode"):
        with fsutil.atomic_file(target, "a"):
            pass


def test_atomic_dir_permissions_and_failure(tmp_path):
    out = tmp_path / "run"
    with fsutil.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    (tmp_path / "plain").mkdir()
    assert (out / "a.txt").read_text() == "1" and _mode(out) == _mode(tmp_path / "plain")
    with pytest.raises(RuntimeError):
        with fsutil.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "run"]
    with pytest.raises(FileExistsError, match=str(out)):
        with fsutil.atomic_dir(out):
            pass
