"""Where one fit step's time goes: network forward / backward and XLA op kinds (not in CI).

  python benchmarks/step_profile.py [--size=128] [--frames=20] [--repeats=5] \
      [--conv_impl=split|shifted|xla] [--vs_torch] [--torch_threads=N] [--top=25] \
      [--loss_only] [--grid="model.subpixel_up=true,false"] [--base="model.spade_time=gain"]

On the synthetic sequence of `fit_speed.py` (T frames, Euler dt 0.1, 10 knots),
with the initial parameters plus N(0, 0.05) noise (so the zero-initialised
layers carry gradient), it times (median of `repeats` after one warm-up):
  * the velocity network's forward pass at the 10 knots;
  * forward + backward of the network alone (the gradient of sum(V * R) with a
    fixed random R);
  * the gradient of the whole fit loss (network, ODE, warps, losses);
  * the gradient of the loss with respect to the knots (everything but the
    network);
with --vs_torch the same first three for the PyTorch peer (`peer_torch.py`,
benchmark environment only), alternating with JAX. Then it traces three calls
of the loss gradient with `jax.profiler` and prints the time per call summed by
XLA op kind (fusion name without its number) and the `top` single ops with
their HLO result shapes.

Every program is compiled with the fit's XLA options (`fit.compiler_options`).

--grid (the syntax of `experiments/ablate.py`) instead times only the loss
gradient under each grid row's FitConfig, the rows called in turn for
`repeats` rounds on the same parameters, and prints each row's median and its
time relative to the first row: an A/B measured in one process.
"""
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax import cpu_malloc, experiment, fit, flow, losses
from echo_ode_jax import model as model_lib

from _case import flop_config, profile_case  # benchmarks/_case.py (this script's folder)

_SIZE = flags.DEFINE_integer("size", 128, "Image side (pixels).")
_FRAMES = flags.DEFINE_integer("frames", 20, "Frames of the sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median).")
_IMPL = flags.DEFINE_string("conv_impl", None, "ModelConfig.conv_impl (default: per backend).")
_TORCH = flags.DEFINE_bool("vs_torch", False, "Also time the PyTorch peer.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None,
                                      "torch.set_num_threads (default: torch's).")
_TOP = flags.DEFINE_integer("top", 25, "Single ops to list.")
_LOSS_ONLY = flags.DEFINE_bool("loss_only", False,
                               "Time the loss gradient only; no other parts, no trace.")
_BASE = flags.DEFINE_string("base", None, "Overrides of the FitConfig for every part "
                            '(ablate.py syntax, one value each, e.g. "model.spade_time=gain").')
_GRID = flags.DEFINE_string("grid", None, "Time the loss gradient for each of these "
                            "configs, interleaved (experiments/ablate.py --grid syntax).")
_HUGE = flags.DEFINE_bool("huge_pages", True, "Restart with glibc's huge-page malloc tunable "
                          "first, as the experiments/ scripts do (echo_ode_jax.cpu_malloc).")


def _median_ms(f, n):
  jax.block_until_ready(f())
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    ts.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(ts))


def _op_times(trace_dir, calls):
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  ev = json.load(gzip.open(path))
  tot = collections.Counter()
  for e in ev["traceEvents"] if isinstance(ev, dict) else ev:
    if e.get("ph") == "X":
      tot[e["name"]] += e.get("dur", 0) / 1e3 / calls     # ms per call
  wrappers = ("PjitFunction", "ThunkExecutor", "CommonPjRt", "$")
  return {n: t for n, t in tot.items() if not n.startswith(wrappers)}


def _loss_grad(cfg, seq):
  """jit: params -> gradient of the fit loss (the fit step's work)."""
  apply = model_lib.VelocityUNet(fit.model_config(cfg)).apply
  return jax.jit(jax.grad(
      lambda p: losses.total_loss(losses.loss_terms(p, seq, cfg, apply)[0], cfg)),
      compiler_options=fit.compiler_options(cfg))


def _grid_ab(cfg, seq, rows, size):
  """Median ms of the loss gradient per grid row, the rows interleaved. Each row
  gets profile_case's parameters for its own model (the same ones for rows
  whose parameter shapes agree)."""
  fns = []
  for ov in rows:
    row_cfg = experiment.apply_overrides(cfg, ov)
    params = profile_case(row_cfg, size, _FRAMES.value)[1]
    f = functools.partial(_loss_grad(row_cfg, seq), params)
    jax.block_until_ready(f())     # compile + warm-up
    fns.append(f)
  times = [[] for _ in rows]
  for _ in range(_REPEATS.value):
    for f, ts in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      ts.append(time.perf_counter() - t0)
  med = [1e3 * float(np.median(ts)) for ts in times]
  print("| config | loss gradient ms | / first row |")
  print("|---|---|---|")
  for ov, m in zip(rows, med):
    print(f"| {experiment.row_label(ov) or 'defaults'} | {m:.0f} | {m / med[0]:.3f} |")


def main(_):
  if _HUGE.value:
    cpu_malloc.reexec_with_huge_pages()
  cfg = fit.FitConfig().replace(**{"model.conv_impl": _IMPL.value})
  if _BASE.value:
    cfg = experiment.base_config(_BASE.value, cfg)
  size = _SIZE.value
  seq, params = profile_case(cfg, size, _FRAMES.value)   # as fit_speed.py
  apply = model_lib.VelocityUNet(fit.model_config(cfg)).apply
  kt = jnp.asarray(flow.knot_times(cfg.solver, cfg.dt), jnp.float32)
  imgs, m0 = seq["image_knots"][..., None], seq["m0"]
  i0 = seq["images"][0][..., None]
  r = jax.random.normal(jax.random.PRNGKey(2), (kt.shape[0], size, size, 2))
  if _GRID.value:
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {size}^2, "
          f"T={_FRAMES.value}, {kt.shape[0]} knots, {_REPEATS.value} rounds")
    _grid_ab(cfg, seq, experiment.parse_grid(_GRID.value), size)
    return

  opts = fit.compiler_options(cfg)

  def programs(cfg):
    apply = model_lib.VelocityUNet(fit.model_config(cfg)).apply
    net = lambda p: apply({"params": p}, imgs, m0, kt, i0)
    return (jax.jit(net, compiler_options=opts),
            jax.jit(jax.grad(lambda p: jnp.sum(net(p) * r)), compiler_options=opts),
            _loss_grad(cfg, seq))

  fwd, net_grad, loss_grad = programs(cfg)
  knots0 = fwd(params)

  # The loss with the network replaced by fixed knots: loss_terms through a
  # constant apply_fn that returns them.
  knots_grad = jax.jit(jax.grad(lambda kn: losses.total_loss(
      losses.loss_terms(params, seq, cfg, lambda *a, **k: kn)[0], cfg)), compiler_options=opts)
  # XLA's cost analysis does not count the native weight gradient (a custom
  # call); the GFLOP column counts the same programs with XLA's conv VJP.
  counted = programs(flop_config(cfg))

  rows = [("network forward", lambda: fwd(params)),
          ("network forward + backward", lambda: net_grad(params)),
          ("loss gradient (the fit step's work)", lambda: loss_grad(params)),
          ("loss gradient w.r.t. the knots (no network)", lambda: knots_grad(knots0))]
  if _LOSS_ONLY.value:
    rows = rows[2:3]
  torch_rows = {}
  if _TORCH.value and not _LOSS_ONLY.value:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peer_torch as pt  # benchmark environment only
    import torch
    if _TORCH_THREADS.value:
      torch.set_num_threads(_TORCH_THREADS.value)
    tm = pt.params_from_flax(pt.TorchVelocityUNet(cfg.model), params)
    ts = pt.seq_tensors(seq_np)
    nchw = lambda a: torch.tensor(np.asarray(a)).permute(0, 3, 1, 2).contiguous()
    t_imgs, t_r = nchw(imgs), nchw(r)
    t_m0 = torch.tensor(np.asarray(m0)).permute(2, 0, 1).contiguous()
    t_i0 = torch.tensor(np.asarray(i0)).permute(2, 0, 1).contiguous()
    t_kt = torch.tensor(np.asarray(kt))

    def t_fwd():
      with torch.no_grad():
        tm(t_imgs, t_m0, t_kt, t_i0)

    def t_net_grad():
      tm.zero_grad()
      (tm(t_imgs, t_m0, t_kt, t_i0) * t_r).sum().backward()

    def t_loss_grad():
      tm.zero_grad()
      pt.total_loss(pt.loss_terms(tm, ts, cfg, "batched")[0], cfg).backward()
    torch_rows = {0: t_fwd, 1: t_net_grad, 2: t_loss_grad}

  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {size}^2, "
        f"T={_FRAMES.value}, {kt.shape[0]} knots, conv_impl={_IMPL.value}")
  fns = {"network forward": (counted[0], params),
         "network forward + backward": (counted[1], params),
         "loss gradient (the fit step's work)": (counted[2], params),
         "loss gradient w.r.t. the knots (no network)": (knots_grad, knots0)}
  print("| part | JAX ms | GFLOP (XLA) | JAX GFLOP/s | PyTorch ms | torch/JAX |")
  print("|---|---|---|---|---|---|")
  for i, (name, f) in enumerate(rows):
    tj = _median_ms(f, _REPEATS.value)
    fn, arg = fns[name]
    cost = fn.lower(arg).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflop = float(cost.get("flops", np.nan)) / 1e9 if cost else np.nan
    cells = f"| {name} | {tj:.0f} | {gflop:.1f} | {gflop / tj * 1e3:.1f} |"
    if i in torch_rows:
      tt = _median_ms(torch_rows[i], _REPEATS.value)
      print(f"{cells} {tt:.0f} | {tt / tj:.2f} |", flush=True)
    else:
      print(f"{cells} | |", flush=True)

  if _LOSS_ONLY.value:
    return
  calls = 3
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(loss_grad(params))
    ops = _op_times(d, calls)
  hlo = loss_grad.lower(params).compile().as_text()
  kinds = collections.Counter()
  for n, t in ops.items():
    kinds[re.sub(r"[._]\d+$", "", n)] += t
  print(f"\ntraced loss gradient: {sum(ops.values()):.0f} ms per call in XLA ops")
  print("| op kind | ms per call |")
  print("|---|---|")
  for n, t in kinds.most_common(15):
    print(f"| {n} | {t:.1f} |")
  print("\n| op | ms per call | HLO |")
  print("|---|---|---|")
  for n, t in sorted(ops.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    m = re.search(r"\n\s*(?:ROOT )?%?" + re.escape(n) + r" = ([^\n]{0,160})", hlo)
    desc = m.group(1).split(", metadata")[0][:110] if m else ""
    print(f"| {n} | {t:.1f} | `{desc}` |")


if __name__ == "__main__":
  app.run(main)
