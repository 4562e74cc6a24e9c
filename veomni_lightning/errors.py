"""The one base class of errors caused by what a user gave us (config, data, sizes, paths).

The ``veomni-lightning`` command prints these as one ``error:`` line (once, from rank 0) instead of a traceback:
their message already names the problem and the fix. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad input from the user: a setting, a data file, a layout, a path. The message says what and how to fix it."""
