"""The package's layering: the import-linter contract in .importlinter holds (no circles, no
upward imports), and function-local imports exist only for slow optional dependencies, each
saying so in a comment."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rpo_jax"
# What a function may import locally: slow or optional libraries, and the one module of rpo_jax
# that wraps them (the bench's PyTorch side, which needs torch, diffusers and transformers).
LOCAL_OK = {"matplotlib", "matplotlib.pyplot", "torch", "diffusers", "transformers", "rpo_jax.perf.torch_ref"}


def test_import_linter_contract_holds():
    lint = pathlib.Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_function_local_imports_are_only_slow_optional_libraries():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    names = ([a.name for a in inner.names] if isinstance(inner, ast.Import)
                             else [inner.module or ""])
                    if isinstance(inner, ast.ImportFrom):  # `from a import b`: the module a.b, if allowed
                        full = {f"{inner.module}.{a.name}" for a in inner.names}
                        names = sorted(full) if full <= LOCAL_OK else names
                    line = lines[inner.lineno - 1]
                    commented = "#" in line or "#" in lines[inner.lineno - 2]
                    if not (set(names) <= LOCAL_OK and (commented or names == ["matplotlib.pyplot"])):
                        found.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {line.strip()}")
    assert not found, "function-local imports:\n" + "\n".join(found)
