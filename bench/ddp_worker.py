"""One rank of the PyTorch DistributedDataParallel run of bench/test_bench_distributed.py.

Started twice by the benchmark (``python bench/ddp_worker.py RANK WORLD PORT``): gloo on the
loopback address, one thread per process.  It trains 784-400-400-10 built from
vigrad.torch.BayesianLinear layers (reparam, the same seeds on every rank, so every rank samples
the same weights, as vigrad's workers do from the step's key) with Adam 1e-3; rank r takes rows
[r B / W, (r + 1) B / W) of each global minibatch.  DDP averages the gradients over the ranks, so
each rank's loss is W x (its rows' NLL sum) + kl_weight KL, whose average is the minibatch's cost.

Protocol on stdin / stdout, one line each: ``run B STEPS`` -> ``done LOSS CHECKSUM`` after STEPS
steps of global batch B (CHECKSUM: the sum of the parameters, equal on every rank when DDP kept
them in sync); ``quit`` ends it.
"""

import os
import sys

import numpy as np


def main():
    rank, world, port = (int(a) for a in sys.argv[1:4])
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import vigrad.torch as vgt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sizes = [784, 400, 400, 10]
    layers = []
    for i in range(3):
        layers.append(vgt.BayesianLinear(sizes[i], sizes[i + 1], seed=i))
        if i < 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    model = DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pool = int(os.environ.get("VIGRAD_BENCH_POOL", "8192"))
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.random((pool, 784), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, pool))
    order = np.random.default_rng(1)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        B, steps = int(cmd[1]), int(cmd[2])
        lo, hi = rank * B // world, (rank + 1) * B // world
        for _ in range(steps):
            idx = torch.from_numpy(order.choice(pool, B, replace=False)[lo:hi])
            out = model(X[idx])
            loss = world * torch.nn.functional.cross_entropy(out, y[idx], reduction="sum") + vgt.kl_loss(net) / 64
            opt.zero_grad()
            loss.backward()
            opt.step()
        checksum = float(sum(p.detach().double().sum() for p in net.parameters()))
        print(f"done {float(loss.detach())!r} {checksum!r}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
