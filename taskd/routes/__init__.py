"""Every route once: method, path, handler, who may call it, body, replies and error statuses.

`app.add_routes` registers `ROUTES` and `openapi.build_document` describes it: a path is
written here and nowhere else. The table is assembled from one module per concern
(`accounts`, `tasks`, `live`, `ops`); `parts` defines what a route is made of.
"""

from __future__ import annotations

from taskd.routes import accounts, live, ops, tasks
from taskd.routes.parts import JSON, PATH_PARAMETERS, Auth, Param, Reply, Route, Schema

ROUTES: tuple[Route, ...] = (*accounts.ROUTES, *tasks.ROUTES, *live.ROUTES, *ops.ROUTES)

__all__ = ["JSON", "PATH_PARAMETERS", "ROUTES", "Auth", "Param", "Reply", "Route", "Schema"]
