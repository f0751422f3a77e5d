"""Flow demo: integrate a known analytic velocity field and plot the deformation.

  python experiments/flow_demo.py [--size=128] [--solver=euler] [--dt=0.1] [--out=flow_demo_out]

Writes <out>/flow_demo.png: the warped grid, a propagated disc mask, and the
Jacobian-determinant map, and prints the error against the analytic solution.
"""
from absl import flags, logging

from echo_ode_jax import cli, demos, flow

_SIZE = flags.DEFINE_integer("size", 128, "Image size in pixels.")
_SOLVER = flags.DEFINE_enum("solver", "euler", list(flow.SOLVERS), "ODE solver.")
_DT = flags.DEFINE_float("dt", 0.1, "Step size.")
_OUT = flags.DEFINE_string("out", "flow_demo_out", "Output folder.")


def main(argv):
  del argv
  res = demos.flow_demo(_SIZE.value, _SOLVER.value, _DT.value, _OUT.value)
  for k, v in res.items():
    logging.info("%s: %s", k, v)
    print(f"{k}: {v}")


if __name__ == "__main__":
  cli.main(main, huge_pages=True)
