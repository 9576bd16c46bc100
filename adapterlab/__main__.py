"""``python -m adapterlab ...`` (and ``torchrun -m adapterlab ...``) runs the command line."""
import sys

from .cli import main

sys.exit(main())
