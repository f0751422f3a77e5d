"""Progress logging with rate and ETA for long jobs (training, batch fits, conversion)."""
from __future__ import annotations

import time

from absl import logging


def _fmt_seconds(s: float) -> str:
  s = max(0.0, float(s))
  if s < 60:
    return f"{s:.0f}s"
  if s < 3600:
    return f"{int(s // 60)}m{int(s % 60):02d}s"
  return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class Progress:
  """Logs `done/total`, the rate in `unit`/s and the ETA.

  Usage::

    prog = Progress(total=len(items), what="convert", unit="patient")
    for item in items:
      ...
      prog.update(1, extra="loss=0.1")
  """

  def __init__(self, total: int, what: str, unit: str = "item",
               min_interval_s: float = 2.0, log_fn=None):
    self.total = int(total)
    self.what = what
    self.unit = unit
    self.done = 0
    self.min_interval_s = min_interval_s
    self._t0 = time.perf_counter()
    self._last = -1e9
    self._log = log_fn or logging.info

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self._t0

  def line(self, extra: str = "") -> str:
    el = self.elapsed
    rate = self.done / el if el > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    eta_s = _fmt_seconds(eta) if rate > 0 else "?"
    msg = (f"{self.what}: {self.done}/{self.total} {self.unit}s, "
           f"{rate:.3g} {self.unit}/s, elapsed {_fmt_seconds(el)}, ETA {eta_s}")
    return f"{msg} | {extra}" if extra else msg

  def update(self, n: int = 1, extra: str = "", force: bool = False) -> None:
    self.done += n
    now = time.perf_counter()
    if force or self.done >= self.total or now - self._last >= self.min_interval_s:
      self._last = now
      self._log(self.line(extra))
