"""``python -m e3fast``: the same as the ``e3fast`` command."""
import sys

from e3fast.cli import main

sys.exit(main())
