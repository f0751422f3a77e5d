"""Paired comparison of two methods scored on the same cases (patients, sequences)."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def paired_difference(a, b, confidence: float = 0.95) -> dict:
  """How much method A's score differs from method B's on the same cases.

  Args:
    a, b: (n,) scores of A and B, case by case (same order). A case where either
      is NaN or infinite (a failed fit, no contour) is left out of every number.
    confidence: of the interval.

  Returns:
    {"n": cases used, "mean": mean of a - b, "ci_low", "ci_high": Student's t
    interval of that mean (scipy.stats.ttest_rel; NaN for n < 2, the mean
    itself when every difference is the same), "p_wilcoxon": two-sided Wilcoxon
    signed-rank p-value of a - b (scipy.stats.wilcoxon; 1 when every
    difference is 0, NaN for n = 0), "a_better", "b_better": cases where a > b
    and where b > a (for error columns, where lower is better, read them the
    other way round)}.
  """
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"paired_difference: {a.size} scores of A against {b.size} of B; "
                     "expected one of each per case")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"paired_difference: confidence must be in (0, 1), got {confidence}")
  keep = np.isfinite(a) & np.isfinite(b)
  d = a[keep] - b[keep]
  out = {"n": int(d.size), "mean": math.nan, "ci_low": math.nan, "ci_high": math.nan,
         "p_wilcoxon": math.nan, "a_better": int(np.sum(d > 0)),
         "b_better": int(np.sum(d < 0))}
  if d.size == 0:
    return out
  out["mean"] = float(d.mean())
  out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue) if d.any() else 1.0
  if d.size >= 2 and np.all(d == d[0]):    # no spread: ttest_rel's interval is NaN
    out["ci_low"] = out["ci_high"] = float(d[0])
  elif d.size >= 2:
    ci = stats.ttest_rel(a[keep], b[keep]).confidence_interval(confidence)
    out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
  return out


def format_difference(p: dict, digits: int = 3) -> str:
  """'+0.012 [-0.003, +0.027], p=0.08' (mean, interval, Wilcoxon p) or '-' when n = 0."""
  if not p["n"]:
    return "-"
  ci = ("" if not math.isfinite(p["ci_low"])
        else f" [{p['ci_low']:+.{digits}f}, {p['ci_high']:+.{digits}f}]")
  pv = "" if not math.isfinite(p["p_wilcoxon"]) else f", p={p['p_wilcoxon']:.2g}"
  return f"{p['mean']:+.{digits}f}{ci}{pv}"


def compare_rows(rows: list[dict], reference: list[dict], columns) -> dict[str, dict]:
  """:func:`paired_difference` of `rows` minus `reference`, per column.

  rows, reference: per-case dicts with "key" and "status" (the rows of
  registration or evaluation, one method each); the cases are the keys "ok" in
  both, and a non-finite value drops that case from that column only.
  columns: names of the numeric fields.
  """
  a = {r["key"]: r for r in rows if r.get("status") == "ok"}
  b = {r["key"]: r for r in reference if r.get("status") == "ok"}
  keys = sorted(set(a) & set(b))

  def value(r, c):
    v = r.get(c)
    return math.nan if v is None else float(v)

  return {c: paired_difference([value(a[k], c) for k in keys], [value(b[k], c) for k in keys])
          for c in columns}


def paired_markdown(diffs: dict[str, tuple[str, dict[str, dict]]], columns) -> str:
  """A Markdown table: per method, its reference and, per column, the mean
  difference [t interval], Wilcoxon p and the cases where the method is better /
  worse.

  diffs: {method: (reference, :func:`compare_rows` of the two)}.
  columns: (field, title, lower_is_better, digits) per column.
  """
  head = "| method | − reference | " + " | ".join(c[1] for c in columns) + " | n |"
  lines = [head, "|---|---|" + ":-:|" * (len(columns) + 1)]
  for name, (ref, d) in diffs.items():
    cells = []
    for field, _, lower_better, digits in columns:
      p = d[field]
      better, worse = ((p["b_better"], p["a_better"]) if lower_better else
                       (p["a_better"], p["b_better"]))
      cells.append(f"{format_difference(p, digits)} ({better} better, {worse} worse)")
    lines.append(f"| {name} | {ref} | " + " | ".join(cells) + f" | {d[columns[0][0]]['n']} |")
  return "\n".join(lines) + "\n"
