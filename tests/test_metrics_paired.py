"""metrics.paired_difference: a paired comparison of two methods, by hand."""
import math

import numpy as np
import pytest

from echo_ode_jax import metrics

T_975_DF2 = 4.302652729749464   # Student's t, 97.5th percentile, 2 degrees of freedom (tables)


def test_three_cases_by_hand():
  """d = a - b = (0.01, 0.02, 0.03): mean 0.02, sd 0.01, 95% interval
  0.02 -/+ t(0.975, 2) 0.01 / sqrt(3); exact Wilcoxon with every d > 0 and n = 3:
  p = 2 / 2^3."""
  p = metrics.paired_difference([0.91, 0.82, 0.73], [0.90, 0.80, 0.70])
  half = T_975_DF2 * 0.01 / math.sqrt(3)
  assert p["n"] == 3 and p["a_better"] == 3 and p["b_better"] == 0
  assert p["mean"] == pytest.approx(0.02)
  assert p["ci_low"] == pytest.approx(0.02 - half) and p["ci_high"] == pytest.approx(0.02 + half)
  assert p["p_wilcoxon"] == pytest.approx(0.25)
  # B against A: the same numbers, signs swapped.
  q = metrics.paired_difference([0.90, 0.80, 0.70], [0.91, 0.82, 0.73])
  assert q["mean"] == pytest.approx(-0.02) and q["ci_high"] == pytest.approx(-0.02 + half)
  assert q["b_better"] == 3 and q["p_wilcoxon"] == pytest.approx(0.25)
  assert metrics.format_difference(q) == "-0.020 [-0.045, +0.005], p=0.25"


def test_failed_cases_are_left_out_of_both():
  a = [0.91, np.nan, 0.82, 0.6, 0.73]
  b = [0.90, 0.5, 0.80, np.inf, 0.70]
  p = metrics.paired_difference(a, b)
  assert p["n"] == 3 and p["mean"] == pytest.approx(0.02)
  assert p["p_wilcoxon"] == pytest.approx(0.25)


def test_mixed_signs_by_hand():
  """d = (+1, -2, +3, +4) (ranks 1, 2, 3, 4): W- = 2; of the 2^4 sign patterns
  those with W- <= 2 are {}, {1}, {2}: p = 2 * 3 / 16."""
  p = metrics.paired_difference([1.0, 0.0, 3.0, 4.0], [0.0, 2.0, 0.0, 0.0])
  assert p["mean"] == pytest.approx(1.5) and (p["a_better"], p["b_better"]) == (3, 1)
  assert p["p_wilcoxon"] == pytest.approx(6 / 16)
  sd = np.sqrt(((1 - 1.5) ** 2 + (-2 - 1.5) ** 2 + (3 - 1.5) ** 2 + (4 - 1.5) ** 2) / 3)
  half = 3.182446305284263 * sd / 2    # t(0.975, 3) (tables) * sd / sqrt(4)
  assert p["ci_low"] == pytest.approx(1.5 - half) and p["ci_high"] == pytest.approx(1.5 + half)


def test_no_difference_and_no_cases():
  p = metrics.paired_difference([0.5, 0.7], [0.5, 0.7])
  assert (p["mean"], p["ci_low"], p["ci_high"], p["p_wilcoxon"]) == (0.0, 0.0, 0.0, 1.0)
  assert (p["a_better"], p["b_better"]) == (0, 0)
  e = metrics.paired_difference([np.nan], [0.5])
  assert e["n"] == 0 and math.isnan(e["mean"]) and metrics.format_difference(e) == "-"


def test_bad_input_is_one_line():
  with pytest.raises(ValueError, match="3 scores of A against 2 of B") as e:
    metrics.paired_difference([1, 2, 3], [1, 2])
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="confidence"):
    metrics.paired_difference([1, 2], [1, 2], confidence=95)


def test_compare_rows_matches_cases_by_key():
  """Rows in different orders, a key only one method has, a None value: the
  cases are matched by key, and each column keeps the cases it has a value for."""
  a = [{"key": "p2", "status": "ok", "x": 0.82, "y": None},
       {"key": "p1", "status": "ok", "x": 0.91, "y": 1.0},
       {"key": "p3", "status": "ok", "x": 0.73, "y": 2.0},
       {"key": "p9", "status": "ok", "x": 0.0, "y": 0.0}]
  b = [{"key": "p1", "status": "ok", "x": 0.90, "y": 3.0},
       {"key": "p3", "status": "ok", "x": 0.70, "y": 3.0},
       {"key": "p2", "status": "ok", "x": 0.80, "y": 3.0},
       {"key": "p4", "status": "missing"}]
  d = metrics.compare_rows(a, b, ["x", "y"])
  assert d["x"]["n"] == 3 and d["x"]["mean"] == pytest.approx(0.02)
  assert d["y"]["n"] == 2 and d["y"]["mean"] == pytest.approx(-1.5)
