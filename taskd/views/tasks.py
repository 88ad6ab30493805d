"""Task list (with a weak ETag), create, retrieve, PUT, PATCH and DELETE (with Idempotency-Key)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel

from taskd import db, keys, store
from taskd.errors import NotAuthenticated
from taskd.models import Answer, Outcome, Task
from taskd.responses import task_body
from taskd.schemas import (
    TaskCreate,
    TaskPatch,
    TaskPut,
    parse_list_query,
    validate_body,
)
from taskd.views.common import (
    answer_response,
    etag,
    if_match,
    if_none_match,
    json_response,
    keyed_request,
    list_etag,
    none_match,
    path_id,
    public_url,
    read_json,
)

STREAM_POSITION = "X-Stream-Position"
# A write, run in a transaction of its own or (`nested`) in its Idempotency-Key's.
Write = Callable[[db.Cursor, bool], Awaitable[Outcome]]


def _answer(request: web.Request, task: Task, status: int = 200) -> Answer:
    location = public_url(request, f"/api/tasks/{task.id}/") if status == 201 else None
    return Answer(status, json.dumps(task_body(task)), etag(task.version), location)


async def _perform(request: web.Request, body: object, write: Write) -> web.Response:
    """Run a write. With an Idempotency-Key: in one transaction with the record of its
    answer, or not at all when the key has one, which is replayed (409 while the first runs,
    422 for another request)."""
    keyed = keyed_request(request, body)
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        if keyed is None:
            outcome, replayed = await write(cur, False), False
        else:
            outcome, replayed = await store.keyed_write(cur, keyed, lambda c: write(c, True))
    if outcome.changed:
        request.app[keys.DOORBELL].ring()
    return answer_response(outcome.answer, replayed)


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


async def _unchanged_list(request: web.Request, query: dict[str, str]) -> web.Response | None:
    """304 when `If-None-Match` names the page as it stands, for one primary-key read (the
    user's stream position: every change moves it). The page itself, when it is read, takes
    its position from its own snapshot, as ever."""
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        position = await store.stream_position(cur, request[keys.USER_ID])
    if position is None:
        return None
    tag = list_etag(request, query, position)
    if not none_match(request, tag):
        return None
    return web.Response(status=304, headers={"ETag": tag, STREAM_POSITION: f"{position}-0"})


async def list_tasks(request: web.Request) -> web.Response:
    # A repeated parameter counts by its last value (later pairs overwrite), as in Django.
    query = dict(request.query.items())
    q = parse_list_query(query)
    if "If-None-Match" in request.headers and (unchanged := await _unchanged_list(request, query)):
        return unchanged
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
    headers = {
        STREAM_POSITION: f"{page.event_seq}-0",
        "ETag": list_etag(request, query, page.event_seq),
    }
    return await json_response(body, size, headers=headers)


async def create_task(request: web.Request) -> web.Response:
    raw = await read_json(request)
    body = validate_body(TaskCreate, raw)
    user_id = request[keys.USER_ID]

    async def write(cur: db.Cursor, nested: bool) -> Outcome:
        task = await store.create_task(
            cur, user_id, title=body.title, description=body.description, done=body.done
        )
        if task is None:
            raise NotAuthenticated("User not found.", code="user_not_found")
        return Outcome(_answer(request, task, status=201), changed=True)

    return await _perform(request, raw, write)


async def get_task(request: web.Request) -> web.Response:
    task_id = path_id(request)
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        task = await store.get_task(cur, request[keys.USER_ID], task_id)
    if if_none_match(request, task.version):
        return web.Response(status=304, headers={"ETag": etag(task.version)})
    return answer_response(_answer(request, task))


async def _update(request: web.Request, model: type[BaseModel]) -> web.Response:
    task_id = path_id(request)
    raw = await read_json(request)
    body = validate_body(model, raw)
    changes = body.model_dump(include=body.model_fields_set)
    user_id, expected = request[keys.USER_ID], if_match(request)

    async def write(cur: db.Cursor, nested: bool) -> Outcome:
        task, changed = await store.update_task(
            cur, user_id, task_id, changes, expected, nested=nested
        )
        return Outcome(_answer(request, task), changed)

    return await _perform(request, raw, write)


async def put_task(request: web.Request) -> web.Response:
    return await _update(request, TaskPut)


async def patch_task(request: web.Request) -> web.Response:
    return await _update(request, TaskPatch)


async def delete_task(request: web.Request) -> web.Response:
    task_id = path_id(request)
    user_id, expected = request[keys.USER_ID], if_match(request)

    async def write(cur: db.Cursor, nested: bool) -> Outcome:
        await store.delete_task(cur, user_id, task_id, expected, nested=nested)
        return Outcome(Answer(204, None, None, None), changed=True)

    return await _perform(request, None, write)
