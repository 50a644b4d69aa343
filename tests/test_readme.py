"""The README's Python example runs as written."""
import pathlib
import re


def test_readme_python_example_runs():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["pictures"].shape == (2, 32, 32, 3)
    assert namespace["final_latents"].shape == (1, 8, 8, 4)
