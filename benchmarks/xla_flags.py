"""The 128² fit step's loss gradient under XLA:CPU flags, one process per setting (not in CI).

  python benchmarks/xla_flags.py [--size=128] [--repeats=5] [--base_flags="..."]

Runs `step_profile.py --loss_only` once per entry of SETTINGS (the first is
the defaults), with its flag appended to --base_flags and its conv_impl. Each
setting is its own process, one after the other, so compare rows of one
invocation only. Prints a markdown table (median ms).
"""
import os
import re
import subprocess
import sys

from absl import app, flags

_SIZE = flags.DEFINE_integer("size", 128, "Image side (pixels).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per setting (median).")
_BASE = flags.DEFINE_string("base_flags", os.environ.get("XLA_FLAGS", ""),
                            "XLA_FLAGS every setting starts from.")

# (extra XLA flag, conv_impl); "" and None are the defaults.
SETTINGS = [
    ("", None), ("", "xla"),
    ("--xla_cpu_use_onednn=true", None), ("--xla_cpu_use_onednn=true", "xla"),
    ("--xla_cpu_experimental_onednn_custom_call=true", "xla"),
    ("--xla_cpu_experimental_onednn_fusion_type=individual_convolution", "xla"),
    ("--xla_cpu_enable_fast_math=true", None),
    ("--xla_cpu_use_thunk_runtime=false", None),
    ("--xla_cpu_experimental_ynn_fusion_type=", None),
    ("--xla_cpu_use_xnnpack=true", None),
    ("--xla_cpu_prefer_vector_width=128", None),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true", None),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=false", None),
    ("--xla_cpu_use_fusion_emitters=false", None),
    ("--xla_cpu_max_isa=AVX2", None),
]


def main(_):
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_profile.py")
  print("| extra XLA flag | conv_impl | loss gradient ms |")
  print("|---|---|---|")
  for flag, impl in SETTINGS:
    env = dict(os.environ, XLA_FLAGS=f"{_BASE.value} {flag}".strip())
    cmd = [sys.executable, script, "--loss_only", f"--size={_SIZE.value}",
           f"--repeats={_REPEATS.value}"] + ([f"--conv_impl={impl}"] if impl else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    m = re.search(r"\| loss gradient[^|]*\| (\d+) \|", out.stdout)
    ms = m.group(1) if m else "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:80]
    print(f"| `{flag or '(none)'}` | {impl or 'default'} | {ms} |", flush=True)


if __name__ == "__main__":
  app.run(main)
