"""pytest-benchmark setup for vigrad: machine facts in the JSON, a record of how busy the
machine was with other work during each benchmark, and the optional torch."""

import hashlib
import os
import subprocess
import time

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


def _installed_digest():
    """SHA-1 over the installed package's files: which build was measured."""
    root = os.path.dirname(vg.__file__)
    h = hashlib.sha1()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the figures depend on: vigrad's build, the libraries, the load at the end."""
    machine_info["vigrad"] = {
        "version": vg.__version__,
        "file": vg.__file__,
        "max_workers": vg.max_workers,
        "build_info": vg.build_info,
        "installed_sha1": _installed_digest(),
        # the source tree when the run ended: the installed build may come from another state
        "tree_commit": _git("rev-parse", "HEAD"),
        "tree_modified": _git("status", "--porcelain", "--untracked-files=no"),
    }
    machine_info["numpy"] = np.__version__
    try:
        import torch
    except ImportError:
        machine_info["torch"] = None
    else:
        machine_info["torch"] = {"version": torch.__version__, "num_threads": 2}
    machine_info["loadavg_at_end"] = os.getloadavg()


@pytest.fixture(scope="session")
def torch():
    """PyTorch on two threads (the machine's cores), or a clean skip when it is not installed."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


def _busy_cpu_seconds():
    """CPU seconds the whole machine has spent busy (all processes), from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(autouse=True)
def _foreign_load(request):
    """Record in each benchmark's extra_info the mean number of cores that other processes
    kept busy while it ran ("foreign_cpu"): on a 2-core machine, anything above ~0.1 means
    the figures are disturbed (vigrad and torch both run two threads)."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    busy0, own0, t0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    yield
    busy1, own1, t1 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    if busy0 is not None and t1 > t0:
        foreign = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)
        benchmark.extra_info["foreign_cpu"] = round(foreign, 3)
