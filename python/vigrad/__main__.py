"""Command line: ``python -m vigrad demo`` runs the seed's worked example; ``python -m vigrad info``
prints how the core was built."""

from __future__ import annotations

import argparse
import json
import math
import sys

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vigrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="fit the seed's Bayes-by-Backprop example and compare with the exact optimum")
    d.add_argument("--steps", type=int, default=3000, help="gradient steps (default 3000)")
    d.add_argument("--samples", type=int, default=10, help="Monte Carlo samples M per step (default 10)")
    d.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01, as in the seed)")
    d.add_argument("--dim", type=int, default=1, help="fit this many independent weights at once (default 1)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--estimator", choices=["pathwise", "stl", "score"], default="pathwise")
    d.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    d.add_argument("--quiet", action="store_true", help="no progress lines")
    d.add_argument("--part", choices=["all", "seed", "bbb"], default="all",
                   help="the seed's example, the Bayes-by-Backprop networks, or both (default)")
    d.add_argument("--plot", metavar="FILE", help="save the predictive band of the toy regression as a PNG "
                   "(needs matplotlib)")
    d.add_argument("--epochs", type=int, default=40, help="epochs of the digits network (default 40)")
    sub.add_parser("info", help="print version and build information as JSON")
    args = parser.parse_args(argv)

    import vigrad as vg

    if args.command == "info":
        from . import _blas

        print(json.dumps({"version": vg.__version__, "max_workers": vg.max_workers, **vg.build_info,
                          "blas_on_vigrad_threads": _blas.name()}, indent=2))
        return 0
    # every argument is checked before any work starts
    for name in ("steps", "samples", "dim", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.plot is not None:
        if args.part == "seed":
            parser.error("--plot draws the Bayes-by-Backprop regression: use it with --part bbb or all")
        from .demo import matplotlib_pyplot

        if matplotlib_pyplot() is None:
            parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    from .demo import run_bbb_demo, run_demo

    if args.part in ("all", "seed"):
        run_demo(steps=args.steps, samples=args.samples, lr=args.lr, dim=args.dim, seed=args.seed,
                 estimator=args.estimator, dtype=args.dtype, progress=not args.quiet)
    if args.part in ("all", "bbb"):
        run_bbb_demo(seed=args.seed, epochs=args.epochs, plot=args.plot, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
