"""cpu_malloc: when the restart happens, that it keeps the command line, and that
the tunables cut the page faults of large buffers (glibc's documented effects)."""
import os
import subprocess
import sys
import textwrap

import pytest

from echo_ode_jax import cpu_malloc

LINUX = dict(system="linux", glibc=(2, 36), thp="madvise")


KEEP = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
        "glibc.malloc.trim_threshold=1099511627776")


def test_tuned_env_sets_the_tunables():
  env = cpu_malloc.tuned_env({"PATH": "/bin"}, **LINUX)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": KEEP}


def test_tuned_env_keeps_the_users_other_tunables():
  """The user's arena_max stays (it is not set twice); the rest are added."""
  env = cpu_malloc.tuned_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
  assert env["GLIBC_TUNABLES"] == (
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:"
      "glibc.malloc.trim_threshold=1099511627776")


@pytest.mark.parametrize("environ,overrides", [
    ({"ECHO_ODE_MALLOC": "default"}, {}),                          # opted out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),            # the user chose
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, {}),              # another malloc
    ({}, {"system": "darwin"}),
    ({}, {"glibc": None}),                                         # musl or unknown
    ({}, {"glibc": (2, 31)}),                                      # no hugetlb tunable
    ({}, {"thp": "never"}),
    ({}, {"thp": None}),
])
def test_tuned_env_leaves_the_process_alone(environ, overrides):
  assert cpu_malloc.tuned_env(environ, **{**LINUX, **overrides}) is None


def _machine_env():
  env = dict(os.environ)
  for k in (cpu_malloc.OPT_OUT, "GLIBC_TUNABLES", "LD_PRELOAD"):
    env.pop(k, None)
  return env


needs_tunable = pytest.mark.skipif(
    cpu_malloc.tuned_env(_machine_env()) is None,
    reason="this machine has no glibc >= 2.35 with transparent huge pages (madvise/always)")


@needs_tunable
def test_run_cli_restarts_with_the_same_command_line(tmp_path):
  script = tmp_path / "cli.py"
  script.write_text(textwrap.dedent("""
      import os, sys
      from absl import app, flags
      from echo_ode_jax.cli import run_cli
      _X = flags.DEFINE_integer("x", 0, "")
      def main(argv):
        print("RESULT", os.environ.get("GLIBC_TUNABLES"), _X.value, argv[1:], sys.flags.optimize)
      if __name__ == "__main__":
        app.run(run_cli(main, huge_pages=True))
  """))
  out = subprocess.run([sys.executable, "-O", str(script), "--x=7", "rest"], env=_machine_env(),
                       capture_output=True, text=True, timeout=120, check=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
  assert lines == [f"RESULT {KEEP} 7 ['rest'] 1"], out.stdout + out.stderr
  assert out.stderr.count("restarting with GLIBC_TUNABLES") == 1


# malloc itself (numpy asks for huge pages on its own), as XLA:CPU allocates:
# from a worker thread. Prints the faults of the first cycle and the fewest of
# the later ones.
_FAULTS = textwrap.dedent("""
    import ctypes, resource, threading
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    n = 256 * 2**20
    faults = []
    def cycles():
      for _ in range(4):                  # malloc, write every byte, free
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
        libc.free(p)
    t = threading.Thread(target=cycles)
    t.start()
    t.join()
    print(faults[0], min(faults[1:]))
""")


def _faults(extra):
  out = subprocess.run([sys.executable, "-c", _FAULTS], env={**_machine_env(), **extra},
                       capture_output=True, text=True, timeout=120, check=True)
  first, later = map(int, out.stdout.split()[-2:])
  return first, later


@needs_tunable
def test_hugetlb_cuts_the_page_faults_of_a_large_buffer():
  """A 256 MiB buffer touched once: 65536 faults of 4 KiB pages under glibc's
  defaults; with hugetlb=1, 2 MiB pages (a few hundred faults here)."""
  plain = _faults({})[1]
  huge = _faults({"GLIBC_TUNABLES": cpu_malloc.HUGETLB})[1]
  assert plain >= 0.9 * 65536
  assert huge < 0.1 * plain, (plain, huge)


@needs_tunable
def test_restart_tunables_reuse_a_freed_large_buffer():
  """With the restart's tunables the first cycle faults the buffer in (2 MiB
  pages: over 100 faults) and every later malloc of the
  same size reuses those pages: (almost) no faults. With hugetlb=1 alone each
  cycle faults it in again."""
  first, later = _faults({"GLIBC_TUNABLES": cpu_malloc.TUNABLE})
  assert first >= 100 and later <= 8, (first, later)
  assert _faults({"GLIBC_TUNABLES": cpu_malloc.HUGETLB})[1] >= 100


def test_hint_is_logged_once_and_only_where_a_restart_would_help(monkeypatch):
  monkeypatch.setattr(cpu_malloc, "_hinted", False)
  assert cpu_malloc.hint({}, "gpu", **LINUX) is None                    # not XLA:CPU
  assert cpu_malloc.hint({cpu_malloc.OPT_OUT: "default"}, "cpu", **LINUX) is None
  assert cpu_malloc.hint({"GLIBC_TUNABLES": cpu_malloc.TUNABLE}, "cpu", **LINUX) is None
  msg = cpu_malloc.hint({}, "cpu", **LINUX)
  assert msg is not None and f"GLIBC_TUNABLES={cpu_malloc.TUNABLE}" in msg
  assert cpu_malloc.hint({}, "cpu", **LINUX) is None                    # once per process
