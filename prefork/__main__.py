"""`python -m prefork` runs the preforkd command."""

import sys

from prefork.cli import main

sys.exit(main())
