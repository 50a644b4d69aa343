"""ml_collections experiment configs, big_vision style: ``--config FILE.py[:ARG]`` + overrides.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``; its docstring holds
the command that runs it and what to expect. ``ARG`` is a string the file parses itself, e.g.
``configs/dreambench_sd21.py:subject=dog,lambda_val=0.5`` (see :func:`parse_arg`).

Overrides are ``--config.KEY=VALUE`` (dots for nesting). Values are parsed as Python literals
where possible and must keep the type of the field they replace (an int may fill a float field).
Unknown keys are rejected with the key named; so are type changes. The resolved config is locked
so code cannot add fields by typo either.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import sys
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from rpo_jax.core import fsutil


class ConfigError(ValueError):
    """A config file, argument or override is wrong; the message names the file or key."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse ``"a=1,b=dog"`` into a ConfigDict, with types from ``defaults`` (which lists every key)."""
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} is not of the form key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        out[key] = _coerce(value, defaults[key], key)
    return out


@contextlib.contextmanager
def _importable(folder: Path):
    """Let the code run inside import modules from ``folder``; afterwards ``sys.path`` and
    ``sys.modules`` are as before (another folder's ``common.py`` is not mistaken for this one)."""
    folder = str(folder.absolute())
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", "") or "").startswith(folder + os.sep):
                del sys.modules[name]


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Import ``FILE.py`` from ``spec`` (``FILE.py[:ARG]``) and return ``get_config(ARG)``; the
    file may import modules beside it (``import common``: the shared base config)."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    module_spec = importlib.util.spec_from_file_location(f"rpo_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    with _importable(file.parent):  # a config may import its siblings, e.g. `import common`
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"cannot import config file {file}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {file} has no get_config(arg=None) function")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{file}: get_config must return an ml_collections.ConfigDict")
    return config


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string


def _coerce(text: str, current: Any, key: str) -> Any:
    if isinstance(current, str):
        return text  # strings are taken verbatim ("123" stays a string)
    value = _literal(text)
    if current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if str(text).lower() in ("true", "false"):
            return str(text).lower() == "true"
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(current)(value)
        if isinstance(value, (int, float, str)):
            return type(current)((value,))
    raise ConfigError(f"--config.{key}={text!r}: expected a value of type "
                      f"{type(current).__name__}, like the default {current!r}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``--config.a.b=value`` strings in order; unknown keys and type changes are errors."""
    for override in overrides:
        if not override.startswith("--config."):
            raise ConfigError(f"unrecognised argument {override!r} (overrides look like "
                              "--config.key=value)")
        body = override[len("--config."):]
        if "=" not in body:
            raise ConfigError(f"override {override!r} has no '=value'")
        key, text = body.split("=", 1)
        node, parts = config, key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r} in {override!r}")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            known = ", ".join(sorted(node.keys()))
            raise ConfigError(f"unknown config key {key!r} in {override!r} (known here: {known})")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a group; set one of its fields")
        node[leaf] = _coerce(text, node[leaf], key)
    return config


def resolve(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """load_config + apply_overrides, then lock the config (no new fields)."""
    config = apply_overrides(load_config(spec), overrides)
    config.lock()
    return config


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-serialisable plain dict of the config (tuples become lists)."""
    return fsutil.jsonable(config)


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples the config files use (recursively)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def workdir_config(workdir: str | os.PathLike,
                   overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config a training run saved in ``workdir/config.json`` (+ ``--config.KEY=VALUE``
    overrides), as a locked ConfigDict."""
    path = Path(workdir).absolute() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {path.parent} is not an rpo-jax training "
                                "workdir (pass --config FILE.py to evaluate with a config file)")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); the workdir's config is damaged") from e
    config = ml_collections.ConfigDict(_tuples(saved))
    config = apply_overrides(config, overrides)
    config.lock()
    return config
