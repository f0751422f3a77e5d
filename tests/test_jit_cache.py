"""echo_ode_jax.jit_cache: the command-line tools' persistent compilation cache."""
import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import jax, jax.numpy as jnp
from echo_ode_jax import jit_cache
print(jit_cache.enable())
jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.ones(7)).block_until_ready()
"""


def _run(tmp_path, **env):
  e = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  e.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu", **env)
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=e, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip().splitlines()[-1]


def test_enable_writes_compiled_programs_to_the_directory(tmp_path):
  cache = tmp_path / "cache"
  assert _run(tmp_path, ECHO_ODE_JIT_CACHE=str(cache)) == str(cache)
  entries = [p.name for p in cache.iterdir() if p.name.startswith("jit_")]
  assert entries, sorted(p.name for p in cache.iterdir())


def test_off_leaves_the_cache_off(tmp_path):
  assert _run(tmp_path, ECHO_ODE_JIT_CACHE="off", HOME=str(tmp_path)) == "None"
  assert not (tmp_path / ".cache").exists()


def test_a_directory_given_to_jax_is_kept(tmp_path):
  theirs = tmp_path / "theirs"
  got = _run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(theirs),
             ECHO_ODE_JIT_CACHE=str(tmp_path / "ours"))
  assert Path(got) == theirs
  assert not (tmp_path / "ours").exists()
