"""Fixtures of the kernel tests."""

import pytest

from tests.pallas_kernels._util import require_backend


@pytest.fixture(params=[pytest.param("gpu", marks=pytest.mark.gpu),
                        pytest.param("tpu", marks=pytest.mark.tpu)])
def native_platform(request):
  """Each accelerator in turn ("gpu", "tpu"), skipped where the default backend is another."""
  require_backend(request.param)
  return request.param
