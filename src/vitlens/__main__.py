"""``python -m vitlens ...``: the command line, also as ``torchrun -m vitlens explain ...``."""

from vitlens.cli import entry_point

if __name__ == "__main__":
    entry_point()
