"""``python -m sumbatch``: the ``sumbatch`` command."""

from sumbatch.cli import main

raise SystemExit(main())
