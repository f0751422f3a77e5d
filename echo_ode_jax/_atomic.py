"""Safe output files: atomic writes, HDF5 writes that survive a full disk, one
writer per output.

* :func:`atomic_path` writes to a hidden temporary file next to the output
  (``.<name>.<random>.tmp``), fsyncs it, renames it onto the output and fsyncs
  the folder. On any exception the temporary file is removed and the output is
  left as it was; a full disk (or a quota or file-size limit) becomes one
  :class:`~echo_ode_jax.errors.OutputError` line naming the output.
* :func:`atomic_h5` does the same for an HDF5 file opened through a guard: the
  HDF5 library does not recover from a failed write (it crashes the process
  when it closes the file), so the guard keeps the bytes of a failed write in
  memory, lets the library finish, and reports the failure once the file is
  closed. :func:`check_writes` reports it earlier, between two units of work.
* :func:`exclusive` is an advisory lock beside the output (``.<name>.lock``,
  removed on release): a second process that wants the same output gets a
  one-line error instead of doing the same work.
* :func:`remove_stale_temporaries` removes the temporary files that a killed
  run left beside an output (call it while holding the output's lock).
"""
from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import glob
import os
import shutil
import tempfile
from typing import Iterator

from echo_ode_jax.errors import InputError, OutputError

# errno values that mean "the data does not fit": a full disk, a quota, a file-size limit.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
TMP_SUFFIX = ".tmp"


def _tmp_prefix(path: str) -> str:
  return "." + os.path.basename(path) + "."


def describe_os_error(e: OSError) -> str:
  """A short description of an OSError, e.g. "no space left on device (ENOSPC)"."""
  name = errno.errorcode.get(e.errno or 0)
  text = (e.strerror or str(e) or e.__class__.__name__).rstrip(".")
  return f"{text[0].lower()}{text[1:]} ({name})" if name else text


def _write_error(path: str, e: OSError) -> OutputError:
  if e.errno in NO_SPACE:
    fix = ("raise the file-size limit (ulimit -f)" if e.errno == errno.EFBIG
           else "free some space")
    return OutputError(path, f"cannot write: {describe_os_error(e)}; nothing was written to "
                       f"it and its temporary file was removed: {fix} and rerun")
  return OutputError(path, f"cannot write: {describe_os_error(e)}")


def _fsync_file(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_dir(folder: str) -> None:
  """Makes a rename in `folder` durable (not every filesystem can open a folder)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, copy_existing: bool = False) -> Iterator[str]:
  """Yields a temporary path next to `path`; fsyncs it and renames it onto `path` on success.

  On an exception the temporary file is removed and `path` is left untouched;
  an OSError meaning a full disk (ENOSPC, EDQUOT, EFBIG), and any OSError while
  creating, copying, syncing or renaming the temporary file, is raised as a
  one-line :class:`OutputError` naming `path`. With `copy_existing`, the
  temporary file starts as a copy of `path` (if it exists), so that an HDF5
  file can be extended atomically.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=folder)
  except OSError as e:
    raise OutputError(path, f"cannot create a file in its folder: {describe_os_error(e)}"
                      ) from None
  os.close(fd)
  try:
    try:
      if copy_existing and os.path.exists(path):
        shutil.copyfile(path, tmp)
        shutil.copymode(path, tmp)
      else:
        os.remove(tmp)  # let the writer create it fresh (h5py mode "w-" etc.)
    except OSError as e:
      raise _write_error(path, e) from None
    yield tmp
    try:
      _fsync_file(tmp)
      os.replace(tmp, path)
    except OSError as e:
      raise _write_error(path, e) from None
    _fsync_dir(folder)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and e.errno in NO_SPACE:
      raise _write_error(path, e) from None
    raise


class GuardedFile:
  """A binary file for h5py's file-object driver that never reports a failed write.

  Writes go to the file on disk until one fails (a full disk, an I/O error);
  from then on the failed bytes and every later write are kept in memory, so
  that reads see what was written and the HDF5 library stays consistent.
  `error` holds the first failure; the file on disk is then incomplete and
  must be discarded.
  """

  def __init__(self, path: str, create: bool):
    flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
    self._fd = os.open(path, flags, 0o666)
    self._pos = 0
    self.error: OSError | None = None
    self._disk_size = os.fstat(self._fd).st_size
    self._size = self._disk_size      # logical size (disk and memory)
    self._starts: list[int] = []      # in-memory extents: sorted, non-overlapping
    self._bufs: list[bytearray] = []

  # The methods h5py's fileobj driver uses.
  def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
    base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
    self._pos = base + offset
    return self._pos

  def tell(self) -> int:
    return self._pos

  def readinto(self, b) -> int:
    mv = memoryview(b).cast("B")
    n = max(0, min(len(mv), self._size - self._pos))
    if n:
      disk_n = max(0, min(n, self._disk_size - self._pos))
      got = 0
      while got < disk_n:
        chunk = os.pread(self._fd, disk_n - got, self._pos + got)
        if not chunk:
          break
        mv[got:got + len(chunk)] = chunk
        got += len(chunk)
      mv[got:n] = bytes(n - got)
      self._patch(mv, self._pos, n)
    self._pos += n
    return n

  def read(self, n: int = -1) -> bytes:
    n = self._size - self._pos if n is None or n < 0 else n
    buf = bytearray(n)
    got = self.readinto(buf)
    return bytes(buf[:got])

  def write(self, b) -> int:
    data = memoryview(b).cast("B")
    n = len(data)
    done = 0
    if self.error is None:
      try:
        while done < n:
          done += os.pwrite(self._fd, data[done:], self._pos + done)
      except OSError as e:
        self.error = e
    if done:
      self._disk_size = max(self._disk_size, self._pos + done)
    if done < n:
      self._keep(self._pos + done, bytes(data[done:]))
    self._pos += n
    self._size = max(self._size, self._pos)
    return n

  def truncate(self, size: int | None = None) -> int:
    size = self._pos if size is None else size
    if self.error is None:
      try:
        os.ftruncate(self._fd, size)
        self._disk_size = size
      except OSError as e:
        self.error = e
    if size < self._size:
      self._drop_from(size)
      self._disk_size = min(self._disk_size, size)
    self._size = size
    return size

  def flush(self) -> None:
    pass

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1

  # In-memory extents.
  def _keep(self, start: int, data: bytes) -> None:
    end = start + len(data)
    i = bisect.bisect_right(self._starts, start)
    if i and self._starts[i - 1] + len(self._bufs[i - 1]) >= start:
      i -= 1
    j = i
    lo, hi = start, end
    while j < len(self._starts) and self._starts[j] <= end:
      lo = min(lo, self._starts[j])
      hi = max(hi, self._starts[j] + len(self._bufs[j]))
      j += 1
    merged = bytearray(hi - lo)
    for s, b in zip(self._starts[i:j], self._bufs[i:j]):
      merged[s - lo:s - lo + len(b)] = b
    merged[start - lo:end - lo] = data
    self._starts[i:j] = [lo]
    self._bufs[i:j] = [merged]

  def _patch(self, mv: memoryview, start: int, n: int) -> None:
    end = start + n
    i = max(0, bisect.bisect_right(self._starts, start) - 1)
    for s, b in zip(self._starts[i:], self._bufs[i:]):
      if s >= end:
        break
      lo, hi = max(s, start), min(s + len(b), end)
      if lo < hi:
        mv[lo - start:hi - start] = b[lo - s:hi - s]

  def _drop_from(self, size: int) -> None:
    keep_s, keep_b = [], []
    for s, b in zip(self._starts, self._bufs):
      if s < size:
        keep_s.append(s)
        keep_b.append(b[:size - s])
    self._starts, self._bufs = keep_s, keep_b


_GUARDS: dict[int, tuple[GuardedFile, str]] = {}


def check_writes(f) -> None:
  """Raises OutputError if a write to `f` (an h5py.File from :func:`atomic_h5`)
  has failed; the context manager then removes the temporary file."""
  guard, path = _GUARDS.get(id(f), (None, ""))
  if guard is not None and guard.error is not None:
    raise _write_error(path, guard.error)


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike, mode: str = "w", copy_existing: bool = False):
  """Yields an h5py.File writing atomically to `path` (see :func:`atomic_path`).

  mode: "w" (a new file) or "a" (with `copy_existing`: extend a copy of
  `path`). A failed write (a full disk) does not reach the HDF5 library: the
  file is finished in memory, then :class:`OutputError` names `path`, the
  temporary file is removed and `path` is left as it was. The caller checks
  that an existing `path` is a readable HDF5 file before extending it.
  """
  import h5py
  if mode not in ("w", "a"):
    raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
  path = os.fspath(path)
  with atomic_path(path, copy_existing=copy_existing) as tmp:
    create = not os.path.exists(tmp)
    try:
      guard = GuardedFile(tmp, create=create)
    except OSError as e:
      raise _write_error(path, e) from None
    try:
      try:
        f = h5py.File(guard, "w" if create else "r+")
      except OSError as e:
        raise OutputError(path, f"cannot open the copy being written as HDF5 ({e})") from None
      _GUARDS[id(f)] = (guard, path)
      try:
        with f:
          yield f
      finally:
        _GUARDS.pop(id(f), None)
    finally:
      guard.close()
    if guard.error is not None:
      raise _write_error(path, guard.error)


def stale_temporaries(path: str | os.PathLike) -> list[str]:
  """The temporary files of :func:`atomic_path` left beside `path` (by a killed run)."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  return sorted(glob.glob(os.path.join(glob.escape(folder),
                                       glob.escape(_tmp_prefix(path)) + "*" + TMP_SUFFIX)))


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
  """Removes :func:`stale_temporaries` of `path` and returns them. Only call
  this while holding `path`'s :func:`exclusive` lock: another writer's
  temporary file would be removed under it."""
  removed = []
  for p in stale_temporaries(path):
    with contextlib.suppress(FileNotFoundError):
      os.remove(p)
      removed.append(p)
  return removed


def lock_path(path: str | os.PathLike, tag: str = "") -> str:
  """The lock file of `path`: ``.<name>[.<tag>].lock`` in its folder."""
  path = os.fspath(path)
  name = "." + os.path.basename(path) + (f".{tag}" if tag else "") + ".lock"
  return os.path.join(os.path.dirname(os.path.abspath(path)), name)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, doing: str, tag: str = "", shared: bool = False):
  """Holds an advisory lock on `path`'s lock file while the block runs.

  A second holder gets InputError "<path>: another process is <doing> this
  file". shared: a shared lock (several cooperating processes; an exclusive
  holder still excludes them all). The lock file is removed when the last
  holder leaves; a process that opened it just before is made to retry on the
  new file, so two holders never hold different files.
  """
  path = os.fspath(path)
  lock = lock_path(path, tag)
  try:
    os.makedirs(os.path.dirname(lock), exist_ok=True)
  except OSError as e:
    raise OutputError(path, f"cannot create its folder: {describe_os_error(e)}") from None
  while True:
    try:
      fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise OutputError(path, f"cannot write in its folder (the lock file "
                        f"{os.path.basename(lock)}): {describe_os_error(e)}") from None
    try:
      fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise InputError(path, f"another process is {doing} this file") from None
    try:
      same = os.stat(lock).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)               # the previous holder removed it: lock the new one
  try:
    yield
  finally:
    try:
      if shared:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # only the last holder gets it
      with contextlib.suppress(OSError):
        os.remove(lock)
    except OSError:
      pass
    finally:
      os.close(fd)               # releases the lock
