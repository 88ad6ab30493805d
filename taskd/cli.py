"""The `taskd` command: `serve`, `migrate`, and `dev` (the launcher behind `make run`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
from pathlib import Path

from aiohttp import web
from pydantic import SecretStr

from taskd import devservers
from taskd.app import create_app
from taskd.config import ConfigError, Settings, check_secret, load_settings
from taskd.db import migrate_dsn
from taskd.logs import AccessLogger, setup_logging

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, help="TOML file (default ./config.toml)")
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument("--host", help="overrides [http] host")
    listen.add_argument("--port", type=int, help="overrides [http] port")
    sub.add_parser("serve", parents=[config, listen], help="serve the API")
    sub.add_parser("migrate", parents=[config], help="apply the schema files in sql/")
    sub.add_parser(
        "dev",
        parents=[config, listen],
        help="development: use the configured Postgres/Redis or start private ones, migrate, serve",
    )
    return parser


def _with_listen(settings: Settings, args: argparse.Namespace) -> Settings:
    http = settings.http.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    return settings.model_copy(update={"http": http})


def _serve(settings: Settings) -> None:
    url = f"http://{settings.http.host}:{settings.http.port}/"

    def announce(_: str) -> None:  # called by run_app once the socket is listening
        print(f"taskd is serving at {url} (Ctrl-C stops it)", flush=True)

    web.run_app(
        create_app(settings),
        host=settings.http.host,
        port=settings.http.port,
        access_log_class=AccessLogger,
        print=announce,
    )


def _dev(settings: Settings) -> None:
    base = devservers.state_dir(Path.cwd())
    postgres, redis = settings.postgres, settings.redis
    with devservers.Services(
        postgres.dsn.get_secret_value(), redis.url.get_secret_value(), base
    ) as services:
        auth = settings.auth
        if not auth.secret.get_secret_value():
            # A throwaway key: tokens die with the process, which is what a dev run wants.
            auth = auth.model_copy(update={"secret": SecretStr(secrets.token_urlsafe(48))})
        settings = settings.model_copy(
            update={
                "postgres": postgres.model_copy(update={"dsn": SecretStr(services.postgres_dsn)}),
                "redis": redis.model_copy(update={"url": SecretStr(services.redis_url)}),
                "auth": auth,
            }
        )
        asyncio.run(migrate_dsn(settings.postgres))
        _serve(settings)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command != "migrate":
            settings = _with_listen(settings, args)
        setup_logging(settings.log)
        if args.command == "serve":
            check_secret(settings)
            _serve(settings)
        elif args.command == "migrate":
            applied = asyncio.run(migrate_dsn(settings.postgres))
            print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none needed'}")
        else:
            _dev(settings)
    except ConfigError as exc:
        print(f"taskd: configuration error: {exc}")
        return 2
    return 0
