"""Loss and sparsity curves of one or several runs, from their metrics.jsonl.

`l2a-plot` (drawing: `l2a_train.curves`; argparse, not Hydra: it takes run directories):

    l2a-plot runs/quickstart --out curves.png
    l2a-plot runs/sweep/* --out sweep.png --smooth 20
"""

import argparse
import sys
from pathlib import Path

from l2a_train.curves import plot_runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="l2a-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="PNG file to write (default: curves.png)")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving-average window in steps")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: no metrics.jsonl in {', '.join(missing)} (give run directories of l2a-train)", file=sys.stderr)
        raise SystemExit(2)
    try:
        out = plot_runs(args.runs, args.out, smooth=args.smooth, title=args.title)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    print(out)


if __name__ == "__main__":
    main()
