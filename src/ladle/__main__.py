"""`python -m ladle ...`: the `ladle` command, for where its console script is not on PATH."""

import sys

from ladle.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
