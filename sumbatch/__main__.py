"""``python -m sumbatch``: the ``sumbatch`` command."""

from sumbatch.cli.main import main

raise SystemExit(main())
