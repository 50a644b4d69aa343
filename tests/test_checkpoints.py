"""Checkpoint reading that falls back past damaged steps (real Orbax folders, damaged on disk),
and the non-finite tests of params."""
import json

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rpo_jax.rpo import checkpoints

W = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)


def _manager(folder):
    return ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))


def _args():
    return ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())


@pytest.fixture
def folder(tmp_path):
    """checkpoints/ with steps 1, 2, 3 of a small tree (w = W + step; random W: incompressible)."""
    folder = tmp_path / "checkpoints"
    m = _manager(folder)
    for step in (1, 2, 3):
        state = {"w": jnp.asarray(W + step), "b": jnp.full((8,), float(step))}
        m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave({"step": step})))
    m.wait_until_finished()
    return folder


def _truncate_largest_data_file(step_dir):
    data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(data, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_truncated_latest_step_is_moved_aside_and_the_previous_one_restored(folder, caplog):
    _truncate_largest_data_file(folder / "3")
    damaged = _snapshot(folder / "3")
    step, restored = checkpoints.restore_newest_readable(_manager(folder), _args)
    assert step == 2 and restored.meta == {"step": 2}
    np.testing.assert_array_equal(restored.state["w"], W + 2)
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2", "3.corrupt"]
    assert _snapshot(folder / "3.corrupt") == damaged  # moved, not changed
    lines = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(lines) == 1 and str(folder / "3") in lines[0] and "3.corrupt" in lines[0]
    assert "\n" not in lines[0]
    # the manager now sees step 2 as the latest: the next save goes on from there
    assert _manager(folder).latest_step() == 2


def test_an_empty_metadata_file_falls_back_too(folder):
    (folder / "3" / "state" / "_METADATA").write_bytes(b"")
    step, _ = checkpoints.restore_newest_readable(_manager(folder), _args)
    assert step == 2 and (folder / "3.corrupt").is_dir()
    # a step 3 damaged again later is moved beside the first, which stays
    (folder / "3").mkdir()
    assert checkpoints.move_aside(folder / "3").name == "3.corrupt-2"
    assert (folder / "3.corrupt" / "state").is_dir()


def test_no_readable_step_is_one_line_error_and_nothing_is_moved(folder):
    for step in ("1", "2"):
        _truncate_largest_data_file(folder / step)
    (folder / "3" / "state" / "_METADATA").write_bytes(b"")
    before = _snapshot(folder)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.restore_newest_readable(_manager(folder), _args)
    message = str(e.value)
    assert "\n" not in message and str(folder) in message and "step 3" in message
    assert "move it away to train again from step 0" in message
    assert _snapshot(folder) == before


def test_an_empty_folder_restores_nothing(tmp_path):
    assert checkpoints.restore_newest_readable(_manager(tmp_path / "c"), _args) == (None, None)


def test_restore_step_names_the_folder(folder):
    _truncate_largest_data_file(folder / "3")
    with pytest.raises(checkpoints.CheckpointError, match=f"{folder / '3'}: the best UNet cannot be read"):
        checkpoints.restore_step(_manager(folder), 3, _args(), "the best UNet")


def test_nonfinite_leaves_and_all_finite():
    tree = {"a": {"kernel": np.ones((2, 2), np.float32)}, "b": np.array([1.0, np.inf], np.float32),
            "c": jnp.array([np.nan], jnp.bfloat16), "n": np.arange(3)}
    assert checkpoints.nonfinite_leaves(tree) == ["b", "c"]
    assert not bool(checkpoints.all_finite(tree))
    assert bool(checkpoints.all_finite({"a": tree["a"], "n": tree["n"]}))
    assert json.dumps(checkpoints.nonfinite_leaves({"x": np.zeros(2)})) == "[]"


def test_writing_names_the_folder_of_an_oserror_without_a_path(tmp_path):
    """Orbax's background save threads raise the OS error of a full disk without a file name."""
    with pytest.raises(OSError) as e:
        with checkpoints.writing(tmp_path / "checkpoints"):
            try:
                raise OSError(28, "No space left on device")
            except OSError as cause:
                raise RuntimeError("Save Finalize thread failed") from cause
    assert (e.value.errno, e.value.filename) == (28, str(tmp_path / "checkpoints"))
    with pytest.raises(OSError) as e:  # a path already named is kept
        with checkpoints.writing(tmp_path):
            raise OSError(13, "Permission denied", "/some/file")
    assert e.value.filename == "/some/file"
