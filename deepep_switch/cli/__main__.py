"""``python -m deepep_switch.cli``: the ``deepep-switch`` command."""

import sys

from . import main

sys.exit(main())
