r"""The Echo-ODE demo on built-in synthetic data (no download, CPU, < 5 minutes).

  python experiments/demo.py
  python experiments/demo.py --num=16 --size=96 --steps=200 --seg_steps=400 --out=demo_big

1. generates synthetic A4C-like sequences (every frame annotated) and a
   training set annotated at ED and ES only;
2. trains a small 2D U-Net on those ED/ES frames and predicts every frame (the
   per-frame baseline);
3. fits Echo-ODE to each test sequence (m_0 = ED ground truth, guided by the
   U-Net's ES/ED prediction) through runner.fit_file;
4. evaluates both, and the ground truth as a reference row, and prints the
   Table I-style table;
5. writes metrics.csv, summary.json, table.md and the figures to --out.

Rerunning the same command resumes; --fresh starts over.
"""
import dataclasses
import json

from absl import flags, logging

from echo_ode_jax import cli, demos

_D = demos.DemoConfig()
flags.DEFINE_integer("num", _D.num, "Test sequences to fit.")
flags.DEFINE_integer("size", _D.size, "Image side in pixels.")
flags.DEFINE_integer("frames", _D.num_frames, "Frames per sequence (ED -> ES).")
flags.DEFINE_integer("steps", _D.steps, "Adam steps per Echo-ODE fit (the paper: 1000).")
flags.DEFINE_integer("velocity_stride", _D.velocity_stride,
                     "The velocity network runs at 1/stride of the grid (the paper: 1).")
flags.DEFINE_integer("seg_steps", _D.seg_steps, "Training steps of the 2D U-Net.")
flags.DEFINE_integer("num_train", _D.num_train, "Training sequences (ED/ES frames) of the U-Net.")
flags.DEFINE_enum("guide", _D.guide, ["segmenter", "gt"], "Guide mask at ES (and ED).")
flags.DEFINE_integer("batch_size", None, "Sequences per compiled fit (default: 8, all of "
                     "the default --num in one).")
flags.DEFINE_integer("seed", _D.seed, "Seed of the synthetic data, the U-Net and the fits.")
flags.DEFINE_string("out", "demo_out", "Output folder.")
flags.DEFINE_bool("fresh", False, "Delete an earlier demo in --out first.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cfg = dataclasses.replace(
      _D, num=FLAGS.num, size=FLAGS.size, num_frames=FLAGS.frames, steps=FLAGS.steps,
      velocity_stride=FLAGS.velocity_stride, seg_steps=FLAGS.seg_steps,
      num_train=FLAGS.num_train, guide=FLAGS.guide, batch_size=FLAGS.batch_size,
      seed=FLAGS.seed)
  res = demos.echo_ode_demo(cfg, FLAGS.out, FLAGS.fresh)
  logging.info("timings (s): %s", json.dumps(res["timings"]))
  print(res["table"], end="")
  print(f"\nwall time {res['seconds']:.0f} s (stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in res["timings"].items()) + ")")
  print(f"wrote {FLAGS.out}/: " + ", ".join(res["files"]))


if __name__ == "__main__":
  cli.main(main, huge_pages=True)
