"""Suite-wide fixtures.

XLA:CPU maps memory for every compiled executable, and a pytest worker compiles thousands
of them. Past the kernel's vm.max_map_count (65,530 by default) the next compile aborts or
segfaults the worker. Dropping JAX's compilation caches after each test module releases the
executables no test still holds, so a long-lived worker stays far below that limit.
"""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
  yield
  jax.clear_caches()
  gc.collect()
