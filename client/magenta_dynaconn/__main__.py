"""``python -m magenta_dynaconn``: the same as the ``dynaconn`` command."""

from __future__ import annotations

import sys

from magenta_dynaconn.cli import main

if __name__ == "__main__":
    sys.exit(main())
