"""XLA flags for the test processes (set before JAX starts; importing this imports no JAX).

`fast_compile()`: with `--xla_backend_optimization_level=0` (the tests' tiny programs), XLA:CPU's
older elemental emitters in place of its fusion emitters compile about 30 % faster (measured:
tests/models 63 → 45 s) at the same results. (At the default optimisation level they compile
slower: the decoder's step 17 → 27 s.)
An XLA that does not know the flag would abort the process, so a throwaway process asks first,
once per session (the answer is passed to subprocesses in the environment)."""

import os
import subprocess
import sys

_FAST = '--xla_cpu_use_fusion_emitters=false'
_KNOWN = 'UNCLIP_TEST_FAST_COMPILE'


def fast_compile() -> str:
  """' --xla_cpu_use_fusion_emitters=false' where this XLA accepts it, else ''."""
  if _KNOWN not in os.environ:
    probe = subprocess.run(
        [sys.executable, '-c', 'import jax; jax.devices()'], capture_output=True, check=False,
        env=dict(os.environ, XLA_FLAGS=_FAST, JAX_PLATFORMS='cpu'), timeout=120)
    os.environ[_KNOWN] = '1' if probe.returncode == 0 else '0'
  return f' {_FAST}' if os.environ[_KNOWN] == '1' else ''
