"""``python -m pvae ...`` is the ``pvae`` command (so that ``torchrun -m pvae`` works too)."""

import sys

from pvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
