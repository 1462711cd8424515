"""pytest-benchmark setup for vigrad: machine facts in the JSON, and the optional torch."""

import os
import subprocess

import numpy as np
import pytest

import vigrad as vg


def _git(*args):
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the figures depend on: vigrad's build, the libraries, the load at start."""
    machine_info["vigrad"] = {
        "version": vg.__version__,
        "file": vg.__file__,
        "max_workers": vg.max_workers,
        "build_info": vg.build_info,
        "source_commit": _git("rev-parse", "HEAD"),
        "source_modified": _git("status", "--porcelain", "--untracked-files=no"),
    }
    machine_info["numpy"] = np.__version__
    try:
        import torch
    except ImportError:
        machine_info["torch"] = None
    else:
        machine_info["torch"] = {"version": torch.__version__, "num_threads": 2}
    machine_info["loadavg_at_start"] = os.getloadavg()


@pytest.fixture(scope="session")
def torch():
    """PyTorch on two threads (the machine's cores), or a clean skip when it is not installed."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch
