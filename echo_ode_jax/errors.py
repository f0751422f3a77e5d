"""Errors for bad input: one line that names the file and the problem."""
from __future__ import annotations

import os


class InputError(ValueError):
  """Bad input data. ``str(err)`` is one line: "<file>: <problem>"."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}" if self.path else problem)


class OutputError(Exception):
  """An output that cannot be written (a full disk, a read-only folder). ``str(err)``
  is one line: "<file>: <problem>". Not an InputError: skipping bad inputs
  (``--skip_bad``) does not skip it."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}" if self.path else problem)

