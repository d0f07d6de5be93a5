"""``python -m kdlab`` is the ``kdlab`` command (and what ``torchrun -m kdlab`` starts on each rank)."""
import sys

from kdlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
