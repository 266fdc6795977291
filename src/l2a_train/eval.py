"""`l2a-eval`: not implemented yet (issue 7: evaluation, pruning and inference)."""

import sys


def main() -> None:
    print("error: l2a-eval is not implemented yet (tracked in issue 7: evaluation, pruning, inference)", file=sys.stderr)
    raise SystemExit(3)


if __name__ == "__main__":
    main()
