"""``python -m cbd_fast ...``: the same command line as the ``cbd-fast`` console script."""

import sys

from cbd_fast.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
