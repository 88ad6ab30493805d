"""Task list, create, retrieve, PUT, PATCH and DELETE."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from taskd import db, keys, store
from taskd.errors import NotAuthenticated
from taskd.models import Task
from taskd.responses import task_body
from taskd.schemas import (
    TaskCreate,
    TaskPatch,
    TaskPut,
    parse_list_query,
    validate_body,
)
from taskd.views.common import (
    etag,
    if_match,
    if_none_match,
    json_response,
    path_id,
    public_url,
    read_json,
)

STREAM_POSITION = "X-Stream-Position"


def _task_response(request: web.Request, task: Task, status: int = 200) -> web.Response:
    headers = {"ETag": etag(task.version)}
    if status == 201:
        headers["Location"] = public_url(request, f"/api/tasks/{task.id}/")
    return web.json_response(task_body(task), status=status, headers=headers)


def _page_links(
    request: web.Request, query: dict[str, str], count: int, limit: int, offset: int
) -> tuple[str | None, str | None]:
    """DRF's limit/offset `next` and `previous`, keeping the other query parameters."""
    following = previous = None
    if offset + limit < count:
        following = public_url(
            request, request.path, {**query, "limit": str(limit), "offset": str(offset + limit)}
        )
    if offset > 0:
        back = {**query, "limit": str(limit)}
        back.pop("offset", None)
        if offset - limit > 0:
            back["offset"] = str(offset - limit)
        previous = public_url(request, request.path, back)
    return following, previous


async def list_tasks(request: web.Request) -> web.Response:
    # A repeated parameter counts by its last value (later pairs overwrite), as in Django.
    query = dict(request.query.items())
    q = parse_list_query(query)
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        page = await store.list_tasks(
            cur,
            request[keys.USER_ID],
            limit=q.limit,
            offset=q.offset,
            done=q.done,
            search=q.search,
            ordering=q.ordering,
        )
    following, previous = _page_links(request, query, page.count, q.limit, q.offset)
    body = {
        "count": page.count,
        "next": following,
        "previous": previous,
        "results": [task_body(task) for task in page.tasks],
    }
    size = sum(len(t.title) + len(t.description) + 200 for t in page.tasks)
    return await json_response(body, size, headers={STREAM_POSITION: f"{page.event_seq}-0"})


async def create_task(request: web.Request) -> web.Response:
    body = validate_body(TaskCreate, await read_json(request))
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        task = await store.create_task(
            cur,
            request[keys.USER_ID],
            title=body.title,
            description=body.description,
            done=body.done,
        )
    if task is None:
        raise NotAuthenticated("User not found.", code="user_not_found")
    request.app[keys.DOORBELL].ring()
    return _task_response(request, task, status=201)


async def get_task(request: web.Request) -> web.Response:
    task_id = path_id(request)
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        task = await store.get_task(cur, request[keys.USER_ID], task_id)
    if if_none_match(request, task.version):
        return web.Response(status=304, headers={"ETag": etag(task.version)})
    return _task_response(request, task)


async def _update(request: web.Request, model: type[BaseModel]) -> web.Response:
    task_id = path_id(request)
    body = validate_body(model, await read_json(request))
    changes = body.model_dump(include=body.model_fields_set)
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        task, changed = await store.update_task(
            cur, request[keys.USER_ID], task_id, changes, if_match(request)
        )
    if changed:
        request.app[keys.DOORBELL].ring()
    return _task_response(request, task)


async def put_task(request: web.Request) -> web.Response:
    return await _update(request, TaskPut)


async def patch_task(request: web.Request) -> web.Response:
    return await _update(request, TaskPatch)


async def delete_task(request: web.Request) -> web.Response:
    task_id = path_id(request)
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        await store.delete_task(cur, request[keys.USER_ID], task_id, if_match(request))
    request.app[keys.DOORBELL].ring()
    return web.Response(status=204)
