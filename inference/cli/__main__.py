"""``python -m pyrovae.inference.cli``: the ``pyrovae`` command (as torchrun launches it)."""

import sys

from pyrovae.inference.cli import main

sys.exit(main())
