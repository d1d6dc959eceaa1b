from sumbatch.cli import main

raise SystemExit(main())
