"""The web dashboard at /dashboard: static pages, every asset in the package.

Plain HTML, CSS and JavaScript from ``static/``, no build step and nothing fetched from
another host, so it works offline. The pages read the API from the browser: the live
event log (``GET /events``, ``GET /grouptasks/{id}/events``), the overview
(``GET /system``), and a group's status; cancelling is ``DELETE /grouptasks/{id}``.
Part of ``web``: may import ``model`` and ``web.responses``.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

from sumbatch.model import ids
from sumbatch.web.responses import error

STATIC = Path(__file__).resolve().parent / "static"

# Only this origin, for everything: what the page needs is in the package, and the
# browser refuses anything else (an asset from a CDN, an inline script).
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The pages are small and change with the package: always revalidated.
    "Cache-Control": "no-cache",
}


def _page(name: str) -> Response:
    return FileResponse(STATIC / name, media_type="text/html; charset=utf-8", headers=HEADERS)


async def root(request: Request) -> Response:
    return RedirectResponse("/dashboard", status_code=307)


async def overview(request: Request) -> Response:
    return _page("overview.html")


async def group_page(request: Request) -> Response:
    gid = ids.parse_uuid(request.path_params["group_task_id"])
    if gid is None or not ids.is_group_id(gid):
        return error(404, "no such groupTaskId")
    return _page("group.html")


class _Static(StaticFiles):
    """The assets, revalidated on each load (ETag, Last-Modified) and never sniffed."""

    def file_response(
        self,
        full_path: PathLike,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(HEADERS)
        return response


def install(app: Starlette) -> None:
    """Add the dashboard's routes to the API's app: ``/`` redirects to ``/dashboard``,
    the overview; ``/dashboard/groups/{id}`` is a group's page; the assets are under
    ``/dashboard/static/``."""
    app.router.routes += [
        Route("/", root, methods=["GET"]),
        Route("/dashboard", overview, methods=["GET"]),
        Route("/dashboard/groups/{group_task_id}", group_page, methods=["GET"]),
        Mount("/dashboard/static", app=_Static(directory=STATIC), name="dashboard-static"),
    ]
