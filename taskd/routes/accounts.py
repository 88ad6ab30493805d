"""The routes of accounts and their logins."""

from __future__ import annotations

from taskd import responses, schemas
from taskd.routes.parts import AUTH_ERRORS, BODY_ERRORS, NO_STORE, Reply, Route
from taskd.views import accounts

TOKENS = Reply("A new access and refresh token.", responses.TokenPair, headers=NO_STORE)
# A password is checked: counted per user (429), hashed in the bounded pool (503).
PASSWORD_ERRORS = (400, 401, 413, 429, 503)

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/api/register/",
        accounts.register,
        "register",
        "Create an account",
        "auth",
        {201: Reply("The new user.", responses.UserOut)},
        (400, 413, 429, 503),
        auth="public",
        body=schemas.Register,
    ),
    Route(
        "POST",
        "/api/login/",
        accounts.login,
        "login",
        "Log in",
        "auth",
        {200: TOKENS},
        (400, 401, 413, 429, 503),
        auth="public",
        body=schemas.Login,
    ),
    Route(
        "POST",
        "/api/token/refresh/",
        accounts.refresh,
        "refreshToken",
        "Rotate a refresh token (the one sent is consumed)",
        "auth",
        {200: TOKENS},
        BODY_ERRORS,
        auth="public",
        body=schemas.RefreshIn,
    ),
    Route(
        "POST",
        "/api/logout/",
        accounts.logout,
        "logout",
        "Revoke the refresh token's whole family",
        "auth",
        {204: Reply("Logged out.", headers=NO_STORE)},
        BODY_ERRORS,
        auth="public",
        body=schemas.RefreshIn,
    ),
    Route(
        "POST",
        "/api/logout/all/",
        accounts.logout_all,
        "logoutAll",
        "End every login of yours, on every replica (access tokens, refresh tokens, streams)",
        "auth",
        {204: Reply("Every login ended, this one included.", headers=NO_STORE)},
        AUTH_ERRORS,
    ),
    Route(
        "POST",
        "/api/password/",
        accounts.change_password,
        "changePassword",
        "Change your password: every other login ends; a new one's tokens are returned",
        "auth",
        {200: TOKENS},
        PASSWORD_ERRORS,
        body=schemas.PasswordChange,
    ),
    Route(
        "GET",
        "/api/me/",
        accounts.me,
        "me",
        "The current user",
        "auth",
        {200: Reply("You.", responses.UserOut)},
        AUTH_ERRORS,
    ),
    Route(
        "DELETE",
        "/api/me/",
        accounts.delete_me,
        "deleteMe",
        "Delete your account, its tasks and events; the username is free again",
        "auth",
        {204: Reply("Deleted; every login of it ended.", headers=NO_STORE)},
        PASSWORD_ERRORS,
        body=schemas.AccountDeletion,
    ),
)
