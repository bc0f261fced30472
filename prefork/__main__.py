"""`python -m prefork`, and the preforkd console script: run the preforkd command."""

import sys

from prefork.early import EarlySignals, ignore_until_exit


def entry() -> int:
    early = EarlySignals.hold()  # first: the imports below take a few tenths of a second
    from prefork.cli import main

    code = main(early=early)
    ignore_until_exit()  # what is left is the interpreter's teardown: the status stands
    return code


if __name__ == "__main__":
    sys.exit(entry())
