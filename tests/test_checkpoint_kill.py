"""A fit with checkpoints, stopped by SIGINT or SIGKILL at random moments, always leaves a
checkpoint that loads, and resuming from it finishes with the bits of an uninterrupted run
(issue 15, item 7)."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import vigrad as vg

# A model whose checkpoint (parameters, Adam moments: about 8 MB) takes longer to write than its
# one full-batch step per epoch, so that most kills land inside a save.
CHILD = """
import os, sys
import numpy as np
import vigrad as vg

path, epochs = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
X = rng.normal(size=(32, 128)).astype(np.float32)
y = rng.integers(0, 10, 32)
m = vg.BayesianMLP([128, 512, 512, 10], likelihood="categorical", rng=0)
print("ready", flush=True)
m.fit(X, y, epochs=epochs, batch_size=32, lr=1e-3, checkpoint=path, resume=os.path.exists(path))
print("done", flush=True)
"""


def _data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 128)).astype(np.float32)
    return X, rng.integers(0, 10, 32)


@pytest.mark.slow
def test_checkpoints_survive_kills_at_random_moments(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "ckpt.npz"
    rng = np.random.default_rng(15)
    seen, kinds = 0, []
    for trial in range(10):
        sig = signal.SIGINT if trial % 2 == 0 else signal.SIGKILL
        proc = subprocess.Popen([sys.executable, str(script), str(path), "100000"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode != 0
        if sig == signal.SIGINT:  # the interrupt surfaced as a KeyboardInterrupt, nothing else
            assert "KeyboardInterrupt" in err and "Error" not in err.replace("KeyboardInterrupt", ""), err
        if not path.exists():  # killed before the first checkpoint
            assert seen == 0
            continue
        saved = vg.BayesianMLP.load(path)  # a whole file: the checksum holds
        epochs = len(saved.history["loss"])
        assert saved._opt_state[0] == epochs  # one step per epoch: a consistent state
        assert epochs >= seen  # the previous checkpoint or a newer one
        seen = epochs
        kinds.append(sig)
    assert seen > 0, "no trial ran long enough to write a checkpoint"

    # resume from the last checkpoint to a few epochs past it: the uninterrupted run's bits
    X, y = _data()
    total = seen + 3
    resumed = vg.BayesianMLP([128, 512, 512, 10], likelihood="categorical", rng=0)
    resumed.fit(X, y, epochs=total, batch_size=32, lr=1e-3, checkpoint=path, resume=True)
    straight = vg.BayesianMLP([128, 512, 512, 10], likelihood="categorical", rng=0)
    straight.fit(X, y, epochs=total, batch_size=32, lr=1e-3)
    np.testing.assert_array_equal(resumed._theta, straight._theta)
    assert resumed.history["loss"] == straight.history["loss"]
