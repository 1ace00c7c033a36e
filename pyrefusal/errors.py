"""Exception types shared by every pyrefusal module.

Every error raised on purpose by pyrefusal derives from :class:`PyrefusalError`, and its
message says what went wrong *and* how to fix it. This module imports nothing else from
the package, so any module may import it.
"""

from __future__ import annotations


class PyrefusalError(Exception):
    """Base class of all errors pyrefusal raises on purpose."""


class DataError(PyrefusalError):
    """A dataset file is missing, unreadable, or does not follow the PolyRefuse schema."""


class ModelError(PyrefusalError):
    """A model file cannot be found, downloaded, verified or loaded."""


class HookError(PyrefusalError):
    """The compute-graph hook was misconfigured or failed inside llama.cpp's graph."""
