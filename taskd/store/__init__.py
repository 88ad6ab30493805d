"""Every SQL statement of the service. Functions take an aiopg cursor and return plain data
(`taskd.models`); the submodules group them by what they store."""

from taskd.store.accounts import (
    UsernameTaken,
    backfill_username_keys,
    create_user,
    get_credentials,
    get_user,
    insert_refresh,
    revoke_family,
    rotate_refresh,
    update_password_hash,
    username_exists,
)
from taskd.store.events import (
    BACKLOG_COUNT_CAP,
    delete_outbox,
    fetch_outbox,
    outbox_backlog,
    ping,
    renumber_pending,
    stream_state,
    try_lead,
)
from taskd.store.tasks import create_task, delete_task, get_task, list_tasks, update_task

__all__ = [
    "BACKLOG_COUNT_CAP",
    "UsernameTaken",
    "backfill_username_keys",
    "create_task",
    "create_user",
    "delete_outbox",
    "delete_task",
    "fetch_outbox",
    "get_credentials",
    "get_task",
    "get_user",
    "insert_refresh",
    "list_tasks",
    "outbox_backlog",
    "ping",
    "renumber_pending",
    "revoke_family",
    "rotate_refresh",
    "stream_state",
    "try_lead",
    "update_password_hash",
    "update_task",
    "username_exists",
]
