"""`python -m hf_hierseg ...` runs the `hf-hierseg` command line."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
