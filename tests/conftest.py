"""pytest fixtures for vigrad's tests; plain helpers live in vg_testutil.py."""

import numpy as np
import pytest

from vg_testutil import DTYPES


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return request.param
