"""Helpers for tests and benchmarks that run the service's real processes; not used by
the service itself. tests/support.py and ops/bench/ both take them from these modules
(there is no re-export here), so each is written once:

- ``ports``: free ports for servers about to start (a cluster's bus ports too).
- ``groups``: submitting groups, reading streams (and the time an entry id carries),
  seeing groups processed and which worker holds which work.
- ``waiting``: polling a condition against a deadline, an HTTP server answering 200.
- ``processes``: the environment and the handling of real ``sumbatch`` processes, and
  what Linux /proc says about their connections.
- ``monitor``: the commands a server is sent, from its MONITOR feed.

At the top layer: it may import any part of sumbatch but ``cli``.
"""
