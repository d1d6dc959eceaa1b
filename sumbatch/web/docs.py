"""/docs: the OpenAPI document rendered by Swagger UI 5 (it reads OpenAPI 3.1), its
assets served from the swagger-ui-py package, so the page needs no network beyond this
server."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

ASSETS = "/docs/static"
PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>sumbatch API</title>
<link rel="stylesheet" href="{ASSETS}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
</script>
</body>
</html>
"""


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


def _assets() -> Path:
    """swagger-ui-py's static directory, found without importing the package (whose
    import brings in its web-framework glue, which is not needed here)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def install(app: Starlette) -> None:
    """Add /docs and its assets to the API's app."""
    assets = _assets()
    app.router.routes.append(Route("/docs", page, methods=["GET"]))
    app.router.routes.append(Mount(ASSETS, app=StaticFiles(directory=assets), name="docs-assets"))
