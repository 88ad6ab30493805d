"""Plain data and rules that several layers share; nothing here does I/O."""

from __future__ import annotations

import unicodedata


def canonical_username(username: str) -> str:
    """The one form in which two usernames are compared: NFKC, case-folded, NFKC again.

    Registration's uniqueness, login's lookup and the per-username throttle all use it, so
    no spelling of a name (`TIMO`, the fullwidth `timo`, `Straße`/`STRASSE`) reaches the
    same account through another door. It is computed here, never in SQL: Postgres' `lower()`
    depends on the database's locale and folds differently (`İ`).
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", username).casefold())
