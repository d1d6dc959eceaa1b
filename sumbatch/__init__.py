"""sumbatch: an event-sourced batch task service on Redis Streams.

The subpackages are its roles, lowest first; each may import only those below it
(``tests/test_layout.py`` holds the rule):

- ``model``: events, key names, ids, the projection fold, validation. Pure: no I/O.
- ``config`` (settings from the environment) and ``outage`` (what a Redis error means).
- ``scripts``: the Lua functions that change state atomically.
- ``store``: every call to Redis.
- ``web``: the API, its docs, metrics, live feeds and the dashboard.
- ``client``: the REST client and the terminal views built on it.
- ``processes``: the keeper of processes (``sumbatch up``), the embedded server.
- ``replay`` and ``testing``; ``cli`` at the top.

The long-running consumers (workers, projector) live in the ``consumers`` package
beside this one, which sumbatch never imports.
"""
