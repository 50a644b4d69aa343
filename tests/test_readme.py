"""The documented Python example (docs/python-api.md, linked from README.md) runs as written."""
import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLE_DOC = ROOT / "docs" / "python-api.md"


def _first_python_block(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    assert path.is_file(), (
        f"{rel} is missing: it should hold the Python API example (the first ```python block), "
        f"linked from README.md")
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{rel} has no ```python block: the Python API example should be its first one"
    return blocks[0]


def test_readme_links_python_api_doc():
    readme = (ROOT / "README.md").read_text()
    assert "docs/python-api.md" in readme, "README.md no longer links docs/python-api.md"


def test_readme_python_example_runs():
    source = _first_python_block(EXAMPLE_DOC)
    namespace = {}
    exec(compile(source, str(EXAMPLE_DOC.relative_to(ROOT)), "exec"), namespace)
    assert namespace["pictures"].shape == (2, 32, 32, 3)
    assert namespace["final_latents"].shape == (1, 8, 8, 4)
