"""``python -m fractalbench ...`` is the ``fractalbench`` command."""
import sys

from fractalbench.harness.cli import main

sys.exit(main())
