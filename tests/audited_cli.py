"""``python tests/audited_cli.py ARGS...`` = ``rpo-jax ARGS...``, recording what this process
writes from Python under a folder (tests/test_multihost.py: only process 0 writes the workdir).

With ``RPO_JAX_TEST_AUDIT=DIR`` and ``RPO_JAX_TEST_AUDIT_ROOT=FOLDER``, every file opened for
writing, folder made, file renamed or removed under FOLDER (Python's audit events ``open``,
``os.mkdir``, ``os.rename``, ``os.remove``, ``shutil.rmtree``) is appended to
``DIR/writes_<process id>.txt`` as ``EVENT PATH``. Writes made by C++ (TensorStore, under Orbax
checkpoints) are not seen.
"""
import os
import runpy
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install(audit_dir: str, root: str, process_id: str) -> None:
    root = os.path.realpath(root)
    os.makedirs(audit_dir, exist_ok=True)
    out = open(os.path.join(audit_dir, f"writes_{process_id}.txt"), "a", buffering=1)

    def under_root(path) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        full = os.path.realpath(os.path.abspath(os.fsdecode(path)))
        return full if full == root or full.startswith(root + os.sep) else None

    def hook(event, args):
        paths = ()
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(flags, int) and flags >= 0 and flags & WRITE_FLAGS) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            paths = (path,) if writes else ()
        elif event in ("os.mkdir", "os.remove", "shutil.rmtree"):
            paths = (args[0],)
        elif event == "os.rename":
            paths = (args[0], args[1])
        for path in paths:
            full = under_root(path)
            if full is not None:
                out.write(f"{event} {os.path.relpath(full, root)}\n")

    sys.addaudithook(hook)


if __name__ == "__main__":
    if os.environ.get("RPO_JAX_TEST_AUDIT"):
        argv = sys.argv[1:]
        pid = argv[argv.index("--process-id") + 1] if "--process-id" in argv else "0"
        _install(os.environ["RPO_JAX_TEST_AUDIT"], os.environ["RPO_JAX_TEST_AUDIT_ROOT"], pid)
    sys.argv = ["rpo-jax"] + sys.argv[1:]
    runpy.run_module("rpo_jax.cli", run_name="__main__", alter_sys=True)
