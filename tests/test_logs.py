"""Process-aware logging and files: only process 0 logs and writes, unless a call says otherwise."""
import json
import logging
import sys

import pytest

from rpo_jax.core import fsutil, logs


@pytest.fixture
def other_process(monkeypatch):
    """Pretend to be process 1 of a multi-process job."""
    monkeypatch.setattr(logs, "is_primary", lambda: False)


def test_records_pass_on_process_zero_only(capsys, monkeypatch):
    logs.configure()
    log = logs.get_logger("rpo_jax.test_module")
    log.info("from process 0")
    monkeypatch.setattr(logs, "is_primary", lambda: False)
    log.info("from process 1")
    log.info("heard everywhere", extra=logs.ALL_PROCESSES)
    assert capsys.readouterr().out == "from process 0\nheard everywhere\n"
    assert logs.get_logger("rpo_jax.test_module").filters.count(logs._PRIMARY_ONLY) == 1


def test_configure_writes_plain_lines_to_stdout_once(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # as a library's basicConfig might add
    root.addHandler(handler)
    try:
        logs.configure()
        logs.configure()  # idempotent: one handler
        logs.get_logger("rpo_jax.test_module").info("one line")
    finally:
        root.removeHandler(handler)
    captured = capsys.readouterr()
    assert captured.out == "one line\n" and "one line" not in captured.err


def test_other_processes_write_no_files(tmp_path, other_process):
    fsutil.write_json({"a": 1}, tmp_path / "x.json")
    with fsutil.atomic_file(tmp_path / "y.bin", "wb") as f:
        f.write(b"data")
    with fsutil.atomic_dir(tmp_path / "folder") as d:
        (d / "inside.txt").write_text("kept nowhere")
    assert list(tmp_path.iterdir()) == []
    fsutil.write_json({"a": 1}, tmp_path / "everyone.json", all_processes=True)
    assert json.loads((tmp_path / "everyone.json").read_text()) == {"a": 1}
