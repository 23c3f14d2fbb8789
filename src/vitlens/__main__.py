"""``python -m vitlens ...``: the command line, also as ``torchrun -m vitlens explain ...``."""

import sys

from vitlens.cli import main

if __name__ == "__main__":
    sys.exit(main())
