"""The routes of tasks."""

from __future__ import annotations

from taskd import responses, schemas
from taskd.routes.parts import BODY_ERRORS, ETAG, STRING, Param, Reply, Route
from taskd.views import tasks

LIST_PARAMETERS = (
    Param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "default": schemas.LIST_LIMIT_DEFAULT},
        f"Page size; above {schemas.LIST_LIMIT_MAX} it is clamped to {schemas.LIST_LIMIT_MAX}.",
    ),
    Param("offset", "query", {"type": "integer", "minimum": 0, "default": 0}, "Rows to skip."),
    Param("done", "query", {"type": "boolean"}, "Only done (or only open) tasks."),
    Param(
        "search",
        "query",
        STRING,
        "A literal substring of the title or description, case-insensitively.",
    ),
    Param(
        "ordering",
        "query",
        {
            "type": "string",
            "enum": [f"{sign}{key}" for key in schemas.ORDERINGS for sign in ("", "-")],
            "default": "-created_at",
        },
        "Sort key, `-` for descending; `title` case-insensitively; ties broken by `id`.",
    ),
    Param(
        "If-None-Match",
        "header",
        STRING,
        "304 when it names the page's current tag (weak comparison) or is `*`.",
    ),
)
IF_MATCH = Param(
    "If-Match",
    "header",
    STRING,
    'Change only if the task is at this version (`"<version>"`, or `*`); else 412.',
)
IF_NONE_MATCH = Param(
    "If-None-Match",
    "header",
    STRING,
    "304 when it names the current version (weak comparison) or is `*`.",
)
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "pattern": "^[!-~]{1,255}$"},
    "Makes the write safe to retry: a repeat (same method, path and body, within 24 h)"
    " replays the first answer with `Idempotency-Replayed: true` and writes nothing; 409"
    " while the first still runs; 422 for another request. Malformed: 400 on"
    " `Idempotency-Key`.",
)
# A write with an Idempotency-Key may also answer these.
KEYED_ERRORS = (409, 422)
WRITE_ERRORS = (400, 401, 404, 409, 412, 413, 422, 503)
REPLAYED = {"Idempotency-Replayed": "IdempotencyReplayed"}
UPDATED = Reply("The task as it now is.", responses.TaskOut, headers={**ETAG, **REPLAYED})
LIST_HEADERS = {"X-Stream-Position": "StreamPosition", "ETag": "ListETag"}

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/api/tasks/",
        tasks.list_tasks,
        "listTasks",
        "List your tasks",
        "tasks",
        {
            200: Reply("A page of tasks.", responses.TaskPage, headers=LIST_HEADERS),
            304: Reply("`If-None-Match` names the page as it stands.", headers=LIST_HEADERS),
        },
        (400, 401, 503),
        params=LIST_PARAMETERS,
    ),
    Route(
        "POST",
        "/api/tasks/",
        tasks.create_task,
        "createTask",
        "Create a task",
        "tasks",
        {
            201: Reply(
                "The new task.",
                responses.TaskOut,
                headers={**ETAG, "Location": "Location", **REPLAYED},
            )
        },
        (*BODY_ERRORS, *KEYED_ERRORS),
        body=schemas.TaskCreate,
        params=(IDEMPOTENCY_KEY,),
    ),
    Route(
        "GET",
        "/api/tasks/{id}/",
        tasks.get_task,
        "getTask",
        "Read a task",
        "tasks",
        {
            200: Reply("The task.", responses.TaskOut, headers=ETAG),
            304: Reply("`If-None-Match` names the current version.", headers=ETAG),
        },
        (401, 404, 503),
        params=(IF_NONE_MATCH,),
    ),
    Route(
        "PUT",
        "/api/tasks/{id}/",
        tasks.put_task,
        "putTask",
        "Replace a task's fields (an omitted optional field keeps its value)",
        "tasks",
        {200: UPDATED},
        WRITE_ERRORS,
        body=schemas.TaskPut,
        params=(IF_MATCH, IDEMPOTENCY_KEY),
    ),
    Route(
        "PATCH",
        "/api/tasks/{id}/",
        tasks.patch_task,
        "patchTask",
        "Change some of a task's fields",
        "tasks",
        {200: UPDATED},
        WRITE_ERRORS,
        body=schemas.TaskPatch,
        params=(IF_MATCH, IDEMPOTENCY_KEY),
    ),
    Route(
        "DELETE",
        "/api/tasks/{id}/",
        tasks.delete_task,
        "deleteTask",
        "Delete a task",
        "tasks",
        {204: Reply("Deleted.", headers=REPLAYED)},
        (400, 401, 404, 409, 412, 422, 503),
        params=(IF_MATCH, IDEMPOTENCY_KEY),
    ),
)
