"""`python -m prefork`, and the preforkd console script: run the preforkd command."""

import sys

from prefork.early import EarlySignals


def entry() -> int:
    early = EarlySignals.hold()  # first: the imports below take a few tenths of a second
    from prefork.cli import main

    return main(early=early)


if __name__ == "__main__":
    sys.exit(entry())
