"""The cursor every store function takes."""

from typing import Any

Cursor = Any  # aiopg.Cursor: aiopg ships no type stubs
