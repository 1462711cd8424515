"""pytest fixtures for vigrad's tests; plain helpers live in vg_testutil.py."""

import numpy as np
import pytest

from vg_testutil import DTYPES


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return request.param


@pytest.fixture
def one_torch_thread():
    """PyTorch on one thread for the test (tiny products: one thread is fastest, and spares the
    shared machine's other cores); skips without torch."""
    torch = pytest.importorskip("torch")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
