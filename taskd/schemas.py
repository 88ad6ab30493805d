"""Request models (pydantic), query parsing, response bodies and DRF-shaped validation errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    BaseModel,
    ConfigDict,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails

from taskd.errors import NON_FIELD, ValidationFailed

TITLE_MAX = 255
DESCRIPTION_MAX = 10_000
USERNAME_MAX = 150
PASSWORD_MIN = 8
PASSWORD_MAX_BYTES = 72  # bcrypt's limit: longer passwords are refused, never truncated
LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 1000
OFFSET_MAX = 2**62  # far past any real list; keeps the value inside Postgres' bigint
ORDERINGS = ("id", "created_at", "updated_at", "title")
READ_ONLY_FIELDS = frozenset({"id", "user", "created_at", "updated_at", "version"})
USERNAME_RE = re.compile(r"^[\w.@+-]+\Z")
# Letters to Unicode (so `\w` takes them) that print as nothing: `admin` and `admin` + one of
# these would look the same. The other invisible characters are not `\w` already.
INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")
BIGINT_MAX = 2**63 - 1
CANONICAL_ID_RE = re.compile(r"[1-9][0-9]{0,18}")
# For the OpenAPI document: what the service writes, as JSON Schema (ECMA-262) patterns.
TIMESTAMP_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$"
EVENT_ID_PATTERN = r"^(0|[1-9][0-9]{0,18})-0$"
JWT_PATTERN = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"


class SchemaHint:
    """JSON Schema keywords for a rule that a validator function (not a constraint) enforces."""

    def __init__(self, **keywords: Any) -> None:
        self.keywords = keywords

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(core_schema), **self.keywords}


def _never_null(schema: dict[str, Any]) -> None:
    """The API refuses null for every field: `X | None = None` only means "may be omitted"."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]
        options = [o for o in prop.get("anyOf", ()) if o != {"type": "null"}]
        if "anyOf" in prop and len(options) == 1:
            del prop["anyOf"]
            prop.update(options[0])
        elif "anyOf" in prop:
            prop["anyOf"] = options


def text_problem(value: str) -> str | None:
    """Why Postgres cannot hold this text (a NUL, a lone surrogate), in DRF's words; else None."""
    if "\x00" in value:
        return "Null characters are not allowed."
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "Invalid unicode: lone surrogate."
    return None


def canonical_id(raw: str) -> int | None:
    """A positive bigint in canonical decimal (ASCII, no sign, no leading zero); else None."""
    if CANONICAL_ID_RE.fullmatch(raw) and (value := int(raw)) <= BIGINT_MAX:
        return value
    return None


class _Body(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, json_schema_extra=_never_null
    )

    @field_validator("*", mode="before")
    @classmethod
    def _present_and_storable(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("This field may not be null.")
        # Postgres refuses both: a 400 on the field here, not a 500 from psycopg2 later.
        if isinstance(value, str) and (problem := text_problem(value)):
            raise ValueError(problem)
        return value


Title = Annotated[
    str,
    StringConstraints(max_length=TITLE_MAX),
    SchemaHint(minLength=1, description="Not only whitespace."),
]
Description = Annotated[str, StringConstraints(max_length=DESCRIPTION_MAX)]


def _check_title(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("This field may not be blank.")
    return value


class TaskCreate(_Body):
    title: Title
    description: Description = ""
    done: bool = False

    _title = field_validator("title")(_check_title)


class TaskPut(_Body):
    """PUT: `title` required; an omitted optional field keeps its value."""

    title: Title
    description: Description | None = None
    done: bool | None = None

    _title = field_validator("title")(_check_title)


class TaskPatch(_Body):
    title: Title | None = None
    description: Description | None = None
    done: bool | None = None

    _title = field_validator("title")(_check_title)


Username = Annotated[
    str,
    StringConstraints(min_length=1, max_length=USERNAME_MAX),
    SchemaHint(description="Letters, digits and @ . + - _; unique, case-insensitively."),
]


class Register(_Body):
    username: Username
    password: Annotated[
        str,
        SchemaHint(
            minLength=PASSWORD_MIN,
            description=f"At most {PASSWORD_MAX_BYTES} bytes in UTF-8 (bcrypt's limit), not"
            " entirely numeric, not the username.",
        ),
    ]
    email: Annotated[
        str, SchemaHint(anyOf=[{"format": "email"}, {"maxLength": 0}], description="Optional.")
    ] = ""

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if not USERNAME_RE.match(value) or INVISIBLE_LETTERS.intersection(value):
            raise ValueError(
                "Enter a valid username. This value may contain only letters, numbers,"
                " and @/./+/-/_ characters."
            )
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        if not value:
            return ""
        try:
            return validate_email(value, check_deliverability=False).normalized
        except EmailNotValidError:
            raise ValueError("Enter a valid email address.") from None


def password_problems(password: str, username: str) -> list[str]:
    """Every rule the password breaks, in DRF's words."""
    problems = []
    if len(password) < PASSWORD_MIN:
        problems.append(
            f"This password is too short. It must contain at least {PASSWORD_MIN} characters."
        )
    if len(password.encode()) > PASSWORD_MAX_BYTES:
        problems.append(
            f"This password is too long: at most {PASSWORD_MAX_BYTES} bytes in UTF-8"
            " (bcrypt's limit)."
        )
    if password.isdigit():
        problems.append("This password is entirely numeric.")
    if password.casefold() == username.casefold():
        problems.append("The password is too similar to the username.")
    return problems


class Login(_Body):
    """Credentials as typed: no length or text rules, which would tell a guesser why it failed."""

    username: Annotated[str, StringConstraints(min_length=1)]
    password: Annotated[str, StringConstraints(min_length=1)]

    @field_validator("username", "password", mode="wrap")
    @classmethod
    def _any_text(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Text no account can have (a NUL, a lone surrogate) skips the 400s of `_Body` and of
        # pydantic's own str check, which refuses a lone surrogate: the view answers it with 401.
        if isinstance(value, str) and text_problem(value):
            return value
        return handler(value)

    @property
    def possible_username(self) -> bool:
        """Whether some account could have this username (else there is nothing to look up)."""
        return len(self.username) <= USERNAME_MAX and text_problem(self.username) is None


class RefreshIn(_Body):
    refresh: Annotated[str, StringConstraints(min_length=1)]


NewPassword = Annotated[str, SchemaHint(minLength=PASSWORD_MIN, description="As at registration.")]


class PasswordChange(_Body):
    old_password: Annotated[str, StringConstraints(min_length=1)]
    new_password: NewPassword


class AccountDeletion(_Body):
    password: Annotated[str, StringConstraints(min_length=1)]


def validate_password_change(data: object, username: str) -> PasswordChange:
    """The body of `POST /api/password/`: the new password follows registration's rules."""
    body = validate_body(PasswordChange, data)
    if problems := password_problems(body.new_password, username):
        raise ValidationFailed({"new_password": problems})
    return body


def _message(err: ErrorDetails) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    field = str(err["loc"][0]) if err["loc"] else NON_FIELD
    match kind:
        case "missing":
            return "This field is required."
        case "extra_forbidden":
            return "This field is read-only." if field in READ_ONLY_FIELDS else "Unknown field."
        case "string_type":
            return "Not a valid string."
        case "bool_type":
            return "Must be a valid boolean."
        case "string_too_long":
            return f"Ensure this field has no more than {ctx['max_length']} characters."
        case "string_too_short":
            return "This field may not be blank."
        case "value_error":
            return str(ctx.get("error", err["msg"]))
        case _:
            return err["msg"]


M = TypeVar("M", bound=BaseModel)


def validate_body(model: type[M], data: object) -> M:
    """Validate a parsed JSON body, raising DRF-shaped field errors."""
    if not isinstance(data, dict):
        kind = {list: "list", str: "str", int: "int", float: "float", bool: "bool"}.get(
            type(data), "null" if data is None else type(data).__name__
        )
        raise ValidationFailed.one(
            NON_FIELD, f"Invalid data. Expected a dictionary, but got {kind}."
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors: dict[str, list[str]] = {}
        for err in exc.errors(include_url=False):
            field = str(err["loc"][0]) if err["loc"] else NON_FIELD
            errors.setdefault(field, []).append(_message(err))
        raise ValidationFailed(errors) from None


def validate_register(data: object) -> Register:
    """Validate a registration: field errors and password rules come back in one 400."""
    errors: dict[str, list[str]] = {}
    body: Register | None = None
    try:
        body = validate_body(Register, data)
    except ValidationFailed as exc:
        errors = exc.errors
    raw = data if isinstance(data, dict) else {}
    password, username = raw.get("password"), raw.get("username")
    # Checked on the raw body, so a bad username does not hide the password's problems.
    if isinstance(password, str) and "password" not in errors:
        similar_to = username if isinstance(username, str) else ""
        if problems := password_problems(password, similar_to):
            errors["password"] = problems
    if body is None or errors:
        raise ValidationFailed(errors)
    return body


@dataclass(frozen=True, slots=True)
class ListQuery:
    limit: int
    offset: int
    done: bool | None
    search: str | None
    ordering: str  # one of ORDERINGS, with "-" for descending


def parse_list_query(query: Mapping[str, str]) -> ListQuery:
    """Parse `GET /api/tasks/` parameters; a bad value is a 400 on that parameter."""
    errors: dict[str, list[str]] = {}

    def integer(name: str, default: int, low: int, high: int) -> int:
        raw = query.get(name)
        if raw is None or raw == "":
            return default
        if not raw.isascii() or not raw.isdigit() or int(raw[:20]) < low:
            errors[name] = [f"Ensure this value is an integer greater than or equal to {low}."]
            return default
        return min(int(raw[:20]) if len(raw) <= 20 else high, high)

    limit = integer("limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX)
    offset = integer("offset", 0, 0, OFFSET_MAX)
    done: bool | None = None
    if (raw_done := query.get("done")) not in (None, ""):
        lowered = str(raw_done).lower()
        if lowered not in ("true", "false"):
            errors["done"] = ["Must be true or false."]
        done = lowered == "true"
    ordering = query.get("ordering") or "-created_at"
    if ordering.removeprefix("-") not in ORDERINGS:
        errors["ordering"] = [f"Must be one of: {', '.join(ORDERINGS)}, optionally with '-'."]
    search = query.get("search") or None
    if search is not None and (problem := text_problem(search)):
        errors["search"] = [problem]
    if errors:
        raise ValidationFailed(errors)
    return ListQuery(limit, offset, done, search, ordering)
