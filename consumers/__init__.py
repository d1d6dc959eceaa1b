"""Long-running consumers of the log: workers and the projector, and the commands
that run them (added to ``sumbatch`` through an entry point). May import any part of
sumbatch but the command line and ``testing``; sumbatch never imports this package."""
