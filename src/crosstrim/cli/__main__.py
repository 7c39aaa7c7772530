"""``python -m crosstrim.cli``: the ``crosstrim`` command (torchrun launches it this way)."""

import sys

from crosstrim.cli import main

sys.exit(main())
