"""The ``sumbatch`` command line, at the top: it may import any part of sumbatch, and
reaches the consumers' commands only through their entry point."""
