"""Whole fits per minute on one machine: the GPU numbers of the speed issue (not in CI).

  python benchmarks/fit_throughput.py [--size=256] [--frames=20] [--batches=1,16,64] \
      [--steps=100] [--compute_dtype=float32] [--batch_mode=loop|vmap] [--distinct=8] \
      [--json_out=FILE]

For each batch size B it fits B synthetic sequences (T frames, Euler dt = 0.1)
with `fit.fit_batch` over all local devices (the runner's path: one compiled
program per chunk of steps, state donated; batch mode "loop" unless
--batch_mode says otherwise) for `--steps` Adam steps, twice with the same
config: the first call compiles, the second is timed. The batch cycles through
`--distinct` generated sequences, each fit with its own key. It reports:

  * seconds per Adam step of the batch, and per sequence;
  * the compile time (first call minus second);
  * seconds for a 1000-step fit of the batch (compile + 1000 steps), and
    sequences per minute at that length;
  * peak device memory (`memory_stats()["peak_bytes_in_use"]`, summed over
    devices; a process-wide maximum, so batch sizes run in increasing order),
    or the process's peak RSS where the backend has no memory stats (CPU).

The per-step time includes the final phi and masks, spread over the steps.
A CPU smoke run: `python benchmarks/fit_throughput.py --size=32 --frames=4
--batches=1,2 --steps=3`.
"""
import resource
import time

from absl import app, flags, logging
import jax

from echo_ode_jax import cpu_malloc, experiment, fit
from echo_ode_jax.data import synthetic
from echo_ode_jax.model import ModelConfig

_SIZE = flags.DEFINE_integer("size", 256, "Square image size (pixels).")
_FRAMES = flags.DEFINE_integer("frames", 20, "Frames per sequence.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes, increasing.")
_STEPS = flags.DEFINE_integer("steps", 100, "Adam steps of the timed fit.")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                           "Conv compute dtype (ModelConfig.compute_dtype).")
_MODE = flags.DEFINE_enum("batch_mode", None, ["loop", "vmap"],
                          "fit_batch's batch mode (default: per backend).")
_DISTINCT = flags.DEFINE_integer("distinct", 8, "Distinct synthetic sequences, cycled to "
                                 "fill a batch (generating them is CPU work, ~2 s each at 256^2).")
_JSON = flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")


def peak_memory_mb() -> tuple[float, str]:
  """(MiB, source): device peak bytes summed over local devices, else peak RSS."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    return sum(s["peak_bytes_in_use"] for s in stats) / 2 ** 20, "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"


def main(_):
  cpu_malloc.reexec_with_huge_pages()
  n = _STEPS.value
  if n < 1:
    raise app.UsageError(f"--steps={n}: need >= 1")
  batches = [int(b) for b in _BATCHES.value]
  size, frames = _SIZE.value, _FRAMES.value
  mesh = fit.batch_mesh()
  mode = _MODE.value or "loop"
  print(f"backend {jax.default_backend()}, {len(jax.local_devices())} device(s) "
        f"({jax.local_devices()[0].device_kind}), {size}^2, T={frames}, mode {mode}, "
        f"{_DTYPE.value}", flush=True)
  cfg = fit.FitConfig(steps=n, log_every=min(50, n),
                      model=ModelConfig(compute_dtype=_DTYPE.value))
  distinct = max(1, min(_DISTINCT.value, max(batches)))
  seqs = [synthetic.make_sequence(i, size=size, num_frames=frames)[0] for i in range(distinct)]
  preps = [fit.prepare_sequence(s.img, s.gt[0], s.gt[-1], cfg=cfg) for s in seqs]
  preps = [preps[i % distinct] for i in range(max(batches))]   # each fit gets its own key
  rows = []
  for b in batches:
    times = []
    for _ in range(2):          # compile + run, then run
      t0 = time.perf_counter()
      res = fit.fit_batch(preps[:b], cfg, mesh=mesh, batch_mode=mode)
      times.append(time.perf_counter() - t0)
      failed = [i for i, r in enumerate(res) if r.failed]
      if failed:
        raise RuntimeError(f"batch {b}: sequences {failed} failed")
      logging.info("batch %d, %d steps: %.1f s", b, n, times[-1])
    step = times[1] / n
    compile_s = max(times[0] - times[1], 0.0)
    fit_1000 = compile_s + 1000 * step
    mem, src = peak_memory_mb()
    row = {"size": size, "frames": frames, "batch": b, "mode": mode,
           "compute_dtype": _DTYPE.value, "backend": jax.default_backend(),
           "devices": len(jax.local_devices()), "steps": n, "s_per_step": step,
           "s_per_step_per_seq": step / b, "compile_s": compile_s, "fit_1000_s": fit_1000,
           "seq_per_min_1000": 60 * b / fit_1000, "peak_mb": mem, "peak_source": src,
           "timed_s": times}
    rows.append(row)
    print(f"| {b} | {step:.4f} | {step / b:.4f} | {compile_s:.1f} | {fit_1000:.1f} "
          f"| {row['seq_per_min_1000']:.2f} | {mem:.0f} ({src}) |", flush=True)
  print("\n| batch | s/step | s/step/seq | compile s | 1000-step fit s | seq/min | peak MiB |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['s_per_step']:.4f} | {r['s_per_step_per_seq']:.4f} "
          f"| {r['compile_s']:.1f} | {r['fit_1000_s']:.1f} | {r['seq_per_min_1000']:.2f} "
          f"| {r['peak_mb']:.0f} ({r['peak_source']}) |")
  if _JSON.value:
    experiment.write_json(_JSON.value, {"rows": rows})


if __name__ == "__main__":
  app.run(main)
