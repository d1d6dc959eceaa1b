"""A trivial in-memory stand-in for the API, to measure the benchmark client's own
floor: same routes and shapes, no Redis, groups are processed the moment they arrive."""

from __future__ import annotations

import sys
import uuid
from typing import Any

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

groups: dict[str, dict[str, Any]] = {}
encode = msgspec.json.encode


async def create(request: Request) -> Response:
    body = msgspec.json.decode(await request.body())
    gid = str(uuid.uuid4())
    results = [t["paramA"] + t["paramB"] for t in body["tasks"]]
    groups[gid] = {
        "groupTaskId": gid,
        "grouptaskProcessed": True,
        "grouptaskSucceeded": True,
        "results": results,
        "tasksCompleted": len(results),
        "tasksTotal": len(results),
    }
    created = {"groupTaskId": gid, "taskIds": [str(uuid.uuid4()) for _ in results]}
    return Response(encode(created), media_type="application/json")


async def get(request: Request) -> Response:
    return Response(encode(groups[request.path_params["gid"]]), media_type="application/json")


async def ready(request: Request) -> Response:
    return Response(b"{}", media_type="application/json")


app = Starlette(
    routes=[
        Route("/grouptasks", create, methods=["POST"]),
        Route("/grouptasks/{gid}", get),
        Route("/readyz", ready),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
