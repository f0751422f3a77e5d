"""Atomic file writes: write to a temporary file in the same folder, then rename."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, copy_existing: bool = False) -> Iterator[str]:
  """Yields a temporary path next to `path`; renames it onto `path` on success.

  On an exception the temporary file is removed and `path` is left untouched.
  With `copy_existing`, the temporary file starts as a copy of `path` (if it
  exists), so that an HDF5 file can be extended atomically.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp", dir=folder)
  os.close(fd)
  try:
    if copy_existing and os.path.exists(path):
      shutil.copyfile(path, tmp)
    else:
      os.remove(tmp)  # let the writer create it fresh (h5py mode "w-" etc.)
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
