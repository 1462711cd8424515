"""Plumbing shared by the example scripts: the optional matplotlib, where a figure goes, and the
command line (``--fast`` / VIGRAD_EXAMPLES_FAST=1, ``--outdir``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["pyplot", "save", "cli"]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, plt, outdir, script):
    """Write ``fig`` as <script stem>.png into outdir (default: next to the script); return the path."""
    out = Path(outdir) if outdir is not None else Path(script).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    path = out / (Path(script).stem + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    return str(path)


def cli(main, doc, fast_help="fewer iterations"):
    """Parse --fast / --outdir and run ``main(fast=..., outdir=...)``."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--fast", action="store_true", help=f"{fast_help} (also VIGRAD_EXAMPLES_FAST=1)")
    parser.add_argument("--outdir", default=None, help="where to write the PNG (default: next to this script)")
    args = parser.parse_args()
    fast = args.fast or os.environ.get("VIGRAD_EXAMPLES_FAST", "0") not in ("", "0")
    main(fast=fast, outdir=args.outdir)
