"""``python -m labvm_spawner.cli``: the ``labvm`` command."""

import sys

from . import main

sys.exit(main())
