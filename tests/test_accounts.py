"""Register, login, refresh rotation and reuse detection, logout, me."""

from __future__ import annotations

import asyncio
from typing import Any

import bcrypt
import psycopg2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskd.app import create_app
from tests.conftest import (
    PASSWORD,
    ClientFactory,
    SettingsFactory,
    User,
    UserFactory,
    register_and_login,
)

Client = TestClient[web.Request, web.Application]


async def post(client: Client, path: str, body: Any) -> tuple[int, Any, Any]:
    async with client.post(path, json=body) as resp:
        text = await resp.text()
        return resp.status, (await resp.json() if text else None), resp.headers


async def test_register_returns_the_account(client: Client) -> None:
    status, body, _ = await post(
        client, "/api/register/", {"username": "Zoë.b+1@x", "password": PASSWORD, "email": ""}
    )
    assert status == 201
    assert body == {"id": body["id"], "username": "Zoë.b+1@x", "email": ""}
    assert isinstance(body["id"], int)


async def test_register_keeps_a_valid_email(client: Client) -> None:
    status, body, _ = await post(
        client,
        "/api/register/",
        {"username": "carol", "password": PASSWORD, "email": "c@example.com"},
    )
    assert (status, body["email"]) == (201, "c@example.com")


async def test_username_is_unique_case_insensitively(client: Client) -> None:
    assert (await post(client, "/api/register/", {"username": "Dave", "password": PASSWORD}))[
        0
    ] == 201
    status, body, _ = await post(
        client, "/api/register/", {"username": "dAVE", "password": PASSWORD}
    )
    assert status == 400
    assert body == {"username": ["A user with that username already exists."]}


async def test_concurrent_registrations_of_one_name_make_one_account(client: Client) -> None:
    results = await asyncio.gather(
        *(
            post(client, "/api/register/", {"username": "race", "password": PASSWORD})
            for _ in range(5)
        )
    )
    assert sorted(status for status, _, _ in results) == [201, 400, 400, 400, 400]


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"password": PASSWORD}, "username", "required"),
        ({"username": "", "password": PASSWORD}, "username", "blank"),
        ({"username": "a b", "password": PASSWORD}, "username", "valid username"),
        ({"username": "x" * 151, "password": PASSWORD}, "username", "150"),
        ({"username": "eve"}, "password", "required"),
        ({"username": "eve", "password": "short1"}, "password", "too short"),
        ({"username": "eve", "password": "12345678901"}, "password", "entirely numeric"),
        ({"username": "evelyn123", "password": "EVELYN123"}, "password", "similar"),
        ({"username": "eve", "password": "é" * 37}, "password", "72 bytes"),
        ({"username": "eve", "password": PASSWORD, "email": "nope"}, "email", "valid email"),
        ({"username": "eve", "password": PASSWORD, "is_staff": True}, "is_staff", "Unknown"),
        ({"username": 7, "password": PASSWORD}, "username", "string"),
        ({"username": "e\u0000ve", "password": PASSWORD}, "username", "Null characters"),
        ({"username": "eve", "password": PASSWORD + "\u0000"}, "password", "Null characters"),
        ({"username": "eve", "password": PASSWORD, "email": "e\u0000@x.org"}, "email", "Null"),
        ({"username": "eve\ud800", "password": PASSWORD}, "username", "lone surrogate"),
        ({"username": "eve\u3164", "password": PASSWORD}, "username", "valid username"),
        ({"username": "\u115f", "password": PASSWORD}, "username", "valid username"),
        ({"username": "eve", "password": "\udc00" + PASSWORD}, "password", "lone surrogate"),
        ({"username": "eve", "password": PASSWORD, "email": "\ud800@x.org"}, "email", "surrogate"),
    ],
)
async def test_register_validation(client: Client, body: Any, field: str, fragment: str) -> None:
    status, answer, _ = await post(client, "/api/register/", body)
    assert status == 400
    assert field in answer
    assert any(fragment in message for message in answer[field]), answer


async def test_every_password_problem_is_reported(client: Client) -> None:
    status, body, _ = await post(client, "/api/register/", {"username": "123", "password": "123"})
    assert status == 400
    assert len(body["password"]) == 3  # short, numeric, same as the username


async def test_field_errors_and_password_problems_come_together(client: Client) -> None:
    status, body, _ = await post(
        client, "/api/register/", {"username": "bad user!", "password": "1"}
    )
    assert status == 400
    assert set(body) == {"username", "password"}
    assert len(body["password"]) == 2  # short, numeric


async def test_login_issues_tokens_not_cached(alice: User, client: Client) -> None:
    status, body, headers = await post(
        client, "/api/login/", {"username": "ALICE", "password": PASSWORD}
    )
    assert status == 200
    assert set(body) == {"access", "refresh"}
    assert headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("alice", "wrong password"),
        ("nobody", PASSWORD),
        ("alice", "x" * 200),
        ("alice", "é" * 40),
        ("alice", "x" * 100_000),
        ("x" * 151, PASSWORD),
        ("x" * 100_000, PASSWORD),
        ("ali\u0000ce", PASSWORD),
        ("alice\ud800", PASSWORD),
        ("alice", PASSWORD + "\u0000"),
        ("alice", PASSWORD + "\ud800"),
    ],
)
async def test_login_failures_look_the_same(
    alice: User, client: Client, username: str, password: str
) -> None:
    status, body, headers = await post(
        client, "/api/login/", {"username": username, "password": password}
    )
    assert status == 401
    assert body == {
        "detail": "No active account found with the given credentials.",
        "code": "no_active_account",
    }
    assert headers["WWW-Authenticate"].startswith("Bearer")


async def test_unknown_user_login_hashes_nothing(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dummy hash an unknown user is checked against was made at start-up."""
    calls = []
    real_hashpw = bcrypt.hashpw

    def counting_hashpw(password: bytes, salt: bytes) -> bytes:
        calls.append(salt)
        return real_hashpw(password, salt)

    monkeypatch.setattr(bcrypt, "hashpw", counting_hashpw)
    status, _, _ = await post(client, "/api/login/", {"username": "nobody", "password": "x"})
    assert (status, calls) == (401, [])


async def test_login_upgrades_a_hash_of_another_cost(
    client: Client,
    aiohttp_client: ClientFactory,
    make_settings: SettingsFactory,
    database_dsn: str,
) -> None:
    def stored_hash() -> str:
        with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT password_hash FROM users WHERE username = 'carol'")
            (value,) = cur.fetchone()
        conn.close()
        return str(value)

    credentials = {"username": "carol", "password": PASSWORD}
    assert (await post(client, "/api/register/", credentials))[0] == 201
    assert stored_hash().startswith("$2b$04$")
    costlier = await aiohttp_client(create_app(make_settings(auth={"bcrypt_rounds": 5})))
    assert (await post(costlier, "/api/login/", credentials))[0] == 200
    upgraded = stored_hash()
    assert upgraded.startswith("$2b$05$")
    assert (await post(costlier, "/api/login/", credentials))[0] == 200
    assert stored_hash() == upgraded  # at the configured cost already: left alone


async def test_login_requires_both_fields(client: Client) -> None:
    status, body, _ = await post(client, "/api/login/", {"username": "x"})
    assert (status, body) == (400, {"password": ["This field is required."]})


async def test_me(alice: User) -> None:
    status, body, _ = await alice.call("GET", "/api/me/")
    assert (status, body) == (200, {"id": alice.id, "username": "alice", "email": ""})


async def test_refresh_rotates(alice: User, client: Client) -> None:
    status, body, headers = await post(client, "/api/token/refresh/", {"refresh": alice.refresh})
    assert status == 200
    assert set(body) == {"access", "refresh"}
    assert body["refresh"] != alice.refresh
    assert headers["Cache-Control"] == "no-store"
    alice.access = body["access"]
    assert (await alice.call("GET", "/api/me/"))[0] == 200
    # The successor works; the consumed token does not.
    assert (await post(client, "/api/token/refresh/", {"refresh": body["refresh"]}))[0] == 200


async def test_reused_refresh_token_revokes_the_family(alice: User, client: Client) -> None:
    _, rotated, _ = await post(client, "/api/token/refresh/", {"refresh": alice.refresh})
    status, body, _ = await post(client, "/api/token/refresh/", {"refresh": alice.refresh})
    assert status == 401
    assert body["code"] == "token_not_valid"
    # The thief's replay also killed the legitimate successor.
    status, body, _ = await post(client, "/api/token/refresh/", {"refresh": rotated["refresh"]})
    assert (status, body["code"]) == (401, "token_not_valid")


async def test_reuse_does_not_touch_other_logins(alice: User, client: Client) -> None:
    _, second_login, _ = await post(
        client, "/api/login/", {"username": "alice", "password": PASSWORD}
    )
    await post(client, "/api/token/refresh/", {"refresh": alice.refresh})
    await post(client, "/api/token/refresh/", {"refresh": alice.refresh})
    status, _, _ = await post(client, "/api/token/refresh/", {"refresh": second_login["refresh"]})
    assert status == 200


async def test_concurrent_refreshes_exactly_one_wins(alice: User, client: Client) -> None:
    results = await asyncio.gather(
        *(post(client, "/api/token/refresh/", {"refresh": alice.refresh}) for _ in range(6))
    )
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 401, 401, 401, 401, 401]
    # Losers are treated as theft: the winner's new token is revoked too.
    winner = next(body for status, body, _ in results if status == 200)
    assert (await post(client, "/api/token/refresh/", {"refresh": winner["refresh"]}))[0] == 401


async def test_logout_revokes_the_family(alice: User, client: Client) -> None:
    _, rotated, _ = await post(client, "/api/token/refresh/", {"refresh": alice.refresh})
    status, body, _ = await post(client, "/api/logout/", {"refresh": rotated["refresh"]})
    assert (status, body) == (204, None)
    assert (await post(client, "/api/token/refresh/", {"refresh": rotated["refresh"]}))[0] == 401
    assert (await post(client, "/api/logout/", {"refresh": rotated["refresh"]}))[0] == 401


async def test_logout_needs_no_access_token(make_user: UserFactory, client: Client) -> None:
    user = await make_user()
    async with client.post("/api/logout/", json={"refresh": user.refresh}) as resp:
        assert resp.status == 204


@pytest.mark.parametrize("path", ["/api/token/refresh/", "/api/logout/"])
@pytest.mark.parametrize(
    ("body", "status", "key"),
    [
        ({}, 400, "refresh"),
        ({"refresh": 5}, 400, "refresh"),
        ({"refresh": None}, 400, "refresh"),
        ({"refresh": "a\u0000b"}, 400, "refresh"),
        ({"refresh": "\ud800"}, 400, "refresh"),
        ({"refresh": "not-a-jwt"}, 401, "code"),
    ],
)
async def test_refresh_and_logout_input(
    client: Client, path: str, body: Any, status: int, key: str
) -> None:
    got, answer, _ = await post(client, path, body)
    assert got == status
    assert key in answer
    if status == 401:
        assert answer["code"] == "token_not_valid"


async def test_access_token_is_not_a_refresh_token(alice: User, client: Client) -> None:
    status, body, _ = await post(client, "/api/token/refresh/", {"refresh": alice.access})
    assert (status, body["code"]) == (401, "token_not_valid")


async def test_login_forgets_the_users_expired_refresh_tokens(
    alice: User, client: Client, database_dsn: str
) -> None:
    conn = psycopg2.connect(database_dsn)
    try:
        with conn, conn.cursor() as cur:
            for table in ("refresh_tokens", "refresh_families"):
                cur.execute(
                    f"UPDATE {table} SET expires_at = now() - interval '1 second'"
                    " WHERE user_id = %s",
                    (alice.id,),
                )
        await post(client, "/api/login/", {"username": "alice", "password": PASSWORD})
        with conn, conn.cursor() as cur:
            for table in ("refresh_tokens", "refresh_families"):
                cur.execute(
                    "SELECT count(*), count(*) FILTER (WHERE expires_at < now())"
                    f" FROM {table} WHERE user_id = %s",
                    (alice.id,),
                )
                assert cur.fetchone() == (1, 0), table
    finally:
        conn.close()


async def fresh_login(client: Client, username: str = "alice") -> str:
    status, body, _ = await post(
        client, "/api/login/", {"username": username, "password": PASSWORD}
    )
    assert status == 200, body
    return str(body["refresh"])


RACE_ROUNDS = 60  # the outside review saw the old code lose these races 3 to 5 times in 40


@pytest.fixture
async def racer(aiohttp_client: ClientFactory, make_settings: SettingsFactory) -> Client:
    """A client whose user `alice` may log in as often as the races need."""
    settings = make_settings(throttle={"login_per_username": 10_000, "refresh_per_user": 10_000})
    client = await aiohttp_client(create_app(settings))
    status, _, _ = await post(client, "/api/register/", {"username": "alice", "password": PASSWORD})
    assert status == 201
    return client


async def test_no_token_of_a_login_works_once_logout_answered(racer: Client) -> None:
    """Logout racing a refresh of the same token: once logout says 204, the token the
    refresh may have issued meanwhile is dead too."""

    async def race(token: str) -> bool:
        """Whether a token survived a logout that answered 204."""
        (refresh, rotated, _), (logout, _, _) = await asyncio.gather(
            post(racer, "/api/token/refresh/", {"refresh": token}),
            post(racer, "/api/logout/", {"refresh": token}),
        )
        assert logout in (204, 401)
        assert refresh in (200, 401)
        if logout == 204 and refresh == 200:
            status, _, _ = await post(racer, "/api/token/refresh/", {"refresh": rotated["refresh"]})
            return status != 401
        return False

    survived = []
    for _ in range(RACE_ROUNDS // 10):
        tokens = [await fresh_login(racer) for _ in range(10)]
        survived += await asyncio.gather(*(race(token) for token in tokens))
    assert not any(survived)


async def test_a_reused_token_kills_the_successor_a_racing_refresh_issues(racer: Client) -> None:
    """A spent token replayed while its legitimate holder refreshes: whoever wins, once the
    replay has answered 401 the family's newest token does not work."""
    survivors = []
    for round_ in range(RACE_ROUNDS):
        spent = await fresh_login(racer)
        status, current, _ = await post(racer, "/api/token/refresh/", {"refresh": spent})
        assert status == 200
        (replay, _, _), (legit, rotated, _) = await asyncio.gather(
            post(racer, "/api/token/refresh/", {"refresh": spent}),
            post(racer, "/api/token/refresh/", {"refresh": current["refresh"]}),
        )
        assert replay == 401
        newest = rotated["refresh"] if legit == 200 else current["refresh"]
        if (await post(racer, "/api/token/refresh/", {"refresh": newest}))[0] != 401:
            survivors.append(round_)
    assert survivors == []


async def test_a_revoked_family_stays_revoked_for_every_token_in_it(
    alice: User, client: Client, database_dsn: str
) -> None:
    """The family row is the truth: even a token row nobody marked is refused."""
    _, rotated, _ = await post(client, "/api/token/refresh/", {"refresh": alice.refresh})
    assert (await post(client, "/api/logout/", {"refresh": rotated["refresh"]}))[0] == 204
    with psycopg2.connect(database_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM refresh_tokens WHERE used_at IS NULL")
        assert cur.fetchone() == (1,)  # the successor's row itself was never touched
    conn.close()
    assert (await post(client, "/api/token/refresh/", {"refresh": rotated["refresh"]}))[0] == 401


# --- one canonical username ------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    ["TIMO", "\uff54\uff49\uff4d\uff4f", "Timo"],  # the fullwidth letters fold to timo
)
async def test_a_name_with_a_taken_canonical_form_is_refused(client: Client, other: str) -> None:
    assert (await post(client, "/api/register/", {"username": "timo", "password": PASSWORD}))[
        0
    ] == 201
    status, body, _ = await post(
        client, "/api/register/", {"username": other, "password": PASSWORD}
    )
    assert (status, body) == (400, {"username": ["A user with that username already exists."]})


async def test_case_folding_goes_beyond_lower(client: Client) -> None:
    """`ß` folds to `ss`, which `lower()` never does: one account, not two."""
    first = await post(client, "/api/register/", {"username": "strasse", "password": PASSWORD})
    second = await post(client, "/api/register/", {"username": "STRAßE", "password": PASSWORD})
    assert (first[0], second[0]) == (201, 400)
    status, _, _ = await post(client, "/api/login/", {"username": "Straße", "password": PASSWORD})
    assert status == 200


async def test_every_spelling_of_a_name_shares_one_throttle_bucket(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(throttle={"login_per_username": 3})
    client = await aiohttp_client(create_app(settings))
    assert (await post(client, "/api/register/", {"username": "timo", "password": PASSWORD}))[
        0
    ] == 201
    for _ in range(3):
        wrong = await post(client, "/api/login/", {"username": "timo", "password": "nope"})
        assert wrong[0] == 401
    # Every spelling that reaches the account is throttled; none logs in.
    for spelling in ["timo", "TIMO", "\uff54\uff49\uff4d\uff4f", "tImO"]:
        status, body, headers = await post(
            client, "/api/login/", {"username": spelling, "password": PASSWORD}
        )
        assert (status, body["code"]) == (429, "throttled"), spelling
        assert int(headers["Retry-After"]) >= 1
    # `tİmo` (capital I with a dot) is another name, not a way into `timo`'s account.
    status, _, _ = await post(
        client, "/api/login/", {"username": "t\u0130mo", "password": PASSWORD}
    )
    assert status == 401


async def test_refreshes_are_throttled_per_user(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    """Each refresh stores a row until it expires: a login refreshing in a loop is slowed."""
    client = await aiohttp_client(create_app(make_settings(throttle={"refresh_per_user": 3})))
    user = await register_and_login(client, "looper")
    token = user.refresh
    for _ in range(3):
        status, body, _ = await post(client, "/api/token/refresh/", {"refresh": token})
        assert status == 200
        token = body["refresh"]
    status, body, headers = await post(client, "/api/token/refresh/", {"refresh": token})
    assert (status, body["code"]) == (429, "throttled")
    assert int(headers["Retry-After"]) >= 1
