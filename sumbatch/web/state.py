"""What the API's lifespan puts in each request's state, read with its type."""

from __future__ import annotations

from starlette.requests import Request

from sumbatch.store.partitions import LazyPartitions, Partitions


async def partitions(request: Request) -> Partitions:
    """The namespace's partitions (opened on first use: Redis may have been away when
    the API started, and then this raises what Redis raises)."""
    lazy: LazyPartitions = request.state.partitions
    return await lazy.get()
