"""The web face: the ASGI app (REST API, long-poll, SSE, metrics, docs, dashboard) and
how uvicorn serves it. May import ``model``, ``config``, ``outage``, ``scripts`` and
``store``; never the client, the processes or the command line."""
