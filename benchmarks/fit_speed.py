"""Seconds per Adam step of the Echo-ODE fit, one run, every row side by side (not in CI).

  python benchmarks/fit_speed.py [--sizes=128,256] [--frames=20] [--batches=1,4] \
      [--repeats=5] [--inloop_sizes=128] [--vs_torch] [--json_out=FILE] \
      [--base="model.spade_time=gain"] [--nohuge_pages]

For each size and batch size it builds synthetic sequences (T frames, Euler,
dt = 0.1, so 10 steps and 10 velocity knots) and reports:
  * the seconds per Adam step of the fit (median of `repeats` timed steps after
    one warm-up), per batch and per sequence, with the batch mode fit_batch
    uses by default ("loop"; see fit.py);
  * the compile time (lower + compile of the step program);
  * the peak memory of the step program by XLA's memory analysis (arguments +
    outputs + temporaries, one sequence's program in loop mode) and the
    process's peak RSS at the end;
  * GFLOP per step (XLA cost analysis of the batched step, traced with XLA's
    ops only where it uses native kernels, custom calls XLA does not count:
    of the compiled program on CPU, of the lowered one elsewhere, whose count still holds the
    convolutions a GPU compile hands to cuDNN; the in-loop row does the same
    work) and the achieved GFLOP/s, against the
    GFLOP/s of a float32 matmul (`--matmul` square) measured in the same run
    (the fastest call, before and after the rows; the higher of the two);
  * the same for the in-loop formulation (the network called inside the ODE
    vector field, a `lax` loop) at `inloop_sizes`, batch 1, and the ratio;
  * the minor page faults and the kernel (system) CPU seconds per JAX step
    (getrusage around the timed JAX steps only): XLA:CPU allocates each
    step's temporaries afresh, and with glibc's malloc every large buffer is a
    new mmap whose pages fault in on first touch. So by default the script
    first restarts itself with glibc's huge-page tunable, as the experiments/
    scripts do (`echo_ode_jax.cpu_malloc`; --nohuge_pages keeps the malloc the
    process started with; `malloc_ab.py` compares mallocs). The PyTorch peer
    runs in the same process, under the same malloc;
  * at batch > 1 (loop mode), the time per sequence against a step of the
    first sequence alone, timed between the batch steps (so a drift of the
    machine between rows does not enter the ratio);
  * with --vs_torch, the PyTorch reference step (benchmarks/peer_torch.py,
    same model, losses and solver; torch runs only in a benchmark environment:
    `python -m venv --system-site-packages .venv-bench &&
    .venv-bench/bin/pip install torch==2.13.0 torchdiffeq`) alternated with the
    JAX step in the same loop, and the ratio of the medians.
"""
import json
import os
import resource
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax import cpu_malloc, experiment, fit, kernels
from echo_ode_jax.data import synthetic
from _case import matmul_gflops  # benchmarks/_case.py (this script's folder)

_SIZES = flags.DEFINE_list("sizes", ["128", "256"], "Square image sizes (pixels).")
_FRAMES = flags.DEFINE_integer("frames", 20, "Frames per sequence.")
_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "Batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per row (median).")
_INLOOP = flags.DEFINE_list("inloop_sizes", ["128"], "Sizes that also time in-loop.")
_INLOOP_REPEATS = flags.DEFINE_integer("inloop_repeats", 2, "Timed in-loop steps.")
_TORCH = flags.DEFINE_bool("vs_torch", False, "Also time benchmarks/peer_torch.py.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None,
                                      "torch.set_num_threads (default: torch's).")
_MODE = flags.DEFINE_enum("batch_mode", None, ["loop", "vmap"],
                          "fit_batch mode (default: loop).")
_MATMUL = flags.DEFINE_integer("matmul", 2048, "Side of the reference matmul.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")
_BASE = flags.DEFINE_string("base", None, "FitConfig overrides, one value each (ablate.py "
                            'grid syntax, e.g. "model.spade_time=gain").')
_HUGE = flags.DEFINE_bool("huge_pages", True, "Restart with glibc's huge-page malloc tunable "
                          "first, as the experiments/ scripts do (echo_ode_jax.cpu_malloc).")


def _analysis(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
            + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return float(cost.get("flops", np.nan)) if cost else np.nan, peak


def sequences(size: int, frames: int, b: int, cfg: fit.FitConfig):
  out = []
  for i in range(b):
    s, _ = synthetic.make_sequence(i, size=size, num_frames=frames)
    out.append(fit.prepare_sequence(s.img, s.gt[0], s.gt[-1], cfg=cfg))
  return out


class JaxStep:
  """One Adam step for B sequences, as fit_batch runs it (mode loop or vmap)."""

  def __init__(self, seqs, cfg, mode, formulation="batched"):
    hw = seqs[0]["images"].shape[1:]
    keys = [jax.random.fold_in(jax.random.PRNGKey(cfg.seed), i) for i in range(len(seqs))]
    def program(cfg):
      if formulation == "inloop":
        step = fit.make_step(cfg, "inloop")
        return jax.jit(lambda st, s, i: step(st, s, i), donate_argnums=(0,),
                       compiler_options=kernels.compiler_options())
      return fit._chunk_fn(cfg, 1, mode == "vmap")
    fn = program(cfg)
    if mode == "vmap":
      self.seqs = [jax.tree_util.tree_map(jnp.asarray, fit.stack(seqs))]
      self.states = [jax.vmap(lambda k: fit.init_state(cfg, k, hw))(jnp.stack(keys))]
    else:
      self.seqs = [jax.tree_util.tree_map(jnp.asarray, s) for s in seqs]
      self.states = [fit.init_state(cfg, k, hw) for k in keys]
    t0 = time.perf_counter()
    lowered = fn.lower(self.states[0], self.seqs[0], jnp.int32(0))
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    self.flops, self.peak_bytes = _analysis(self.compiled)
    if jax.default_backend() == "cpu" and kernels.native_available():
      # The native kernels are custom calls XLA does not count: count the same
      # step traced afresh with XLA's ops only.
      with kernels.forced("off"):
        fresh = (program(cfg) if formulation == "inloop"
                 else fit._chunk_fn.__wrapped__(cfg, 1, mode == "vmap"))
        self.flops = _analysis(fresh.lower(self.states[0], self.seqs[0],
                                           jnp.int32(0)).compile())[0]
    if jax.default_backend() != "cpu":
      # The compiled GPU program's cost analysis leaves out the convolutions
      # it hands to cuDNN (0.70 GFLOP counted at 128^2 on an H100); the
      # lowered program still has them as HLO convolutions.
      cost = lowered.cost_analysis()
      self.flops = float(cost.get("flops", np.nan)) if cost else np.nan
    self.i = 0
    self.faults, self.sys_s = [], []   # per step (getrusage, whole process)

  def step(self) -> float:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    outs = []
    for j, s in enumerate(self.seqs):
      self.states[j], terms = self.compiled(self.states[j], s, jnp.int32(self.i))
      outs.append(terms)
    jax.block_until_ready((self.states, outs))
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    self.faults.append(r1.ru_minflt - r0.ru_minflt)
    self.sys_s.append(r1.ru_stime - r0.ru_stime)
    self.i += 1
    return dt

  def step_first(self) -> float:
    """One step of the first sequence alone (loop mode): the batch-1 time, taken
    between batch steps so that both see the same machine state."""
    t0 = time.perf_counter()
    self.states[0], terms = self.compiled(self.states[0], self.seqs[0], jnp.int32(self.i))
    jax.block_until_ready((self.states[0], terms))
    return time.perf_counter() - t0


def main(_):
  if _HUGE.value:
    cpu_malloc.reexec_with_huge_pages()
  cfg = fit.FitConfig()
  if _BASE.value:
    cfg = experiment.base_config(_BASE.value, cfg)
    print(f"config overrides: {_BASE.value}")
  if cfg.ensemble != 1:
    raise SystemExit("fit_speed.py times one fit per sequence: set ensemble=1")
  if _TORCH.value and cfg.lambda_ncc:
    cfg = cfg.replace(lambda_ncc=0.0)
    print("--vs_torch: lambda_ncc=0 on both sides (the peer reproduces the paper's step)")
  mode = _MODE.value or "loop"
  peak = matmul_gflops(_MATMUL.value)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"backend {jax.default_backend()}, jax {jax.__version__}, batch mode {mode}")
  print(f"matmul {_MATMUL.value}^2 float32: {peak:.1f} GFLOP/s")
  print(f"allocator: {cpu_malloc.describe()}")
  torch_mod = None
  if _TORCH.value:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peer_torch as torch_mod  # noqa: E402  (benchmark environment only)
  rows = []
  for size in map(int, _SIZES.value):
    for b in map(int, _BATCHES.value):
      seqs = sequences(size, _FRAMES.value, b, cfg)
      js = JaxStep(seqs, cfg, mode)
      tf = None
      if torch_mod is not None:
        tf = torch_mod.TorchFit(seqs, cfg, formulation="batched",
                                threads=_TORCH_THREADS.value)
        tf.step()
      js.step()   # warm-up
      js.faults, js.sys_s = [], []
      tj, tt, t1 = [], [], []
      for _ in range(_REPEATS.value):   # alternate, so both see the same machine state
        tj.append(js.step())
        if b > 1 and mode == "loop":
          t1.append(js.step_first())
        if tf is not None:
          t0 = time.perf_counter()
          tf.step()
          tt.append(time.perf_counter() - t0)
      med = float(np.median(tj))
      flops = js.flops * (len(js.seqs) if mode == "loop" else 1)
      row = {"size": size, "batch": b, "frames": _FRAMES.value, "formulation": "batched",
             "mode": mode, "s_per_step": med, "s_per_seq_step": med / b,
             "compile_s": js.compile_s, "gflop_per_step": flops / 1e9,
             "gflops": flops / med / 1e9,
             "xla_peak_mb": (js.peak_bytes or 0) / 2 ** 20,
             "minflt_per_step": float(np.median(js.faults)),
             "sys_s_per_step": float(np.median(js.sys_s))}
      if t1:
        row["b1_s_per_step_interleaved"] = float(np.median(t1))
        row["seq_step_over_b1"] = med / b / row["b1_s_per_step_interleaved"]
      if tt:
        row["torch_s_per_step"] = float(np.median(tt))
        row["torch_over_jax"] = row["torch_s_per_step"] / med
      rows.append(row)
      print(json.dumps(row), flush=True)
      del js, tf
      if b == 1 and str(size) in _INLOOP.value:
        js = JaxStep(seqs[:1], cfg, "loop", formulation="inloop")
        js.step()
        ti = float(np.median([js.step() for _ in range(_INLOOP_REPEATS.value)]))
        # XLA's cost analysis counts a while loop's body once, so the in-loop
        # program's count is too low; the work is the batched step's.
        work = row["gflop_per_step"] / b
        irow = {"size": size, "batch": 1, "frames": _FRAMES.value, "formulation": "inloop",
                "s_per_step": ti, "compile_s": js.compile_s,
                "gflop_per_step": work, "gflops": work / ti,
                "xla_peak_mb": (js.peak_bytes or 0) / 2 ** 20,
                "inloop_over_batched": ti / med}
        rows.append(irow)
        print(json.dumps(irow), flush=True)
        del js
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  first, last = peak, matmul_gflops(_MATMUL.value)
  peak = max(first, last)   # % matmul against the host's best rate of the run
  for r in rows:
    if r["formulation"] == "batched":
      r["pct_matmul"] = 100 * r["gflops"] / peak
  print(f"\npeak RSS of this process: {rss:.0f} MB; matmul {peak:.1f} GFLOP/s "
        f"(before the rows {first:.1f}, after {last:.1f})\n")
  hdr = ("| size | batch | formulation | s/step | s/seq/step | compile s | GFLOP/step "
         "| GFLOP/s | % matmul | XLA peak MB | faults/step | sys s/step | s/seq / b1 "
         "| torch s/step | torch/JAX | in-loop/batched |")
  print(hdr)
  print("|" + "---|" * (hdr.count("|") - 1))
  for r in rows:
    g = lambda k, f="{:.3g}": f.format(r[k]) if k in r else ""
    print(f"| {r['size']}² | {r['batch']} | {r['formulation']} | {g('s_per_step')} "
          f"| {g('s_per_seq_step')} | {g('compile_s', '{:.1f}')} | {g('gflop_per_step')} "
          f"| {g('gflops')} | {g('pct_matmul', '{:.0f}')} | {g('xla_peak_mb', '{:.0f}')} "
          f"| {g('minflt_per_step', '{:.0f}')} | {g('sys_s_per_step', '{:.3f}')} "
          f"| {g('seq_step_over_b1', '{:.2f}')} "
          f"| {g('torch_s_per_step')} | {g('torch_over_jax', '{:.2f}')} "
          f"| {g('inloop_over_batched', '{:.1f}')} |")
  if _JSON.value:
    experiment.write_json(_JSON.value, {"matmul_gflops": peak, "matmul_gflops_before": first,
                                        "matmul_gflops_after": last, "peak_rss_mb": rss,
                                        "allocator": cpu_malloc.describe(), "rows": rows})


if __name__ == "__main__":
  app.run(main)
