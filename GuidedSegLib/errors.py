"""Errors a user can act on: each names the file (or store) and the problem in one line."""

from __future__ import annotations

import os


class GuidedSegError(Exception):
    """Base class of every error GuidedSeg raises on purpose."""


class InputFileError(GuidedSegError, ValueError):
    """A file that cannot be used: unreadable, wrong shape, wrong values, wrong geometry."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path = os.fspath(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.problem}")


class StoreError(GuidedSegError, ValueError):
    """A case store that is missing, malformed, or asked to do something it must refuse."""

    def __init__(self, store: str | os.PathLike[str], problem: str):
        self.store = os.fspath(store)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.store}: {self.problem}")
