import pytest
import torch

from gpu_support import require_cuda, usable_kernel


@pytest.fixture
def cuda() -> torch.device:
    """The GPU; the test skips, saying so, where there is none."""
    return require_cuda()


@pytest.fixture
def kernel(backend):
    """The block kernel of the test's ``backend`` parameter; skips where it cannot run here."""
    return usable_kernel(backend)
