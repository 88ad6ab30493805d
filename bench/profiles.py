"""Sizes of a run: full (`make bench`), quick (`make bench-quick`) and tiny (the test)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    # CRUD: wrk (or pgbench) with this many connections for this long per case.
    crud_seconds: float
    warmup_seconds: float  # a retrieve run before the measured ones: pools open lazily
    crud_users: int  # requests rotate over these users, so PATCHes do not all lock one row
    crud_tasks_per_user: int  # seeded; a list of 20 then returns a full page
    # Live: subscriber counts, each measured over SSE and over WebSocket.
    subscriber_counts: tuple[int, ...]
    live_seconds: float  # of writes, after every subscriber is connected
    catchup_clients: int
    catchup_before_seconds: float  # live delivery before the restart
    catchup_after_seconds: float  # writes go on this long after the replica is back
    drain_seconds: float  # the restarted replica's http.drain_seconds
    storm_logins: int
    rtt_samples: int  # bare Redis XADD -> XREAD round trips
    connections: int = 32  # as in the wrk numbers
    worker_counts: tuple[int, ...] = (1, 2)
    live_workers: int = 2  # the live figures are for `--workers 2`
    writes_per_second: float = 20.0
    subscribers_per_user: int = 10
    settle_seconds: float = 1.0  # after a server start / after opening, before RSS is read
    max_per_process: int = 2500  # subscriber connections per client process


FULL = Profile(
    name="full",
    crud_seconds=10.0,
    warmup_seconds=2.0,
    crud_users=64,
    crud_tasks_per_user=20,
    subscriber_counts=(100, 1000, 10000),
    # Over 15 s: every connection's first SSE ping / WebSocket heartbeat falls inside it.
    live_seconds=25.0,
    catchup_clients=1000,
    catchup_before_seconds=2.0,
    catchup_after_seconds=8.0,
    drain_seconds=5.0,  # the default
    storm_logins=60,
    rtt_samples=1000,
)
QUICK = Profile(
    name="quick",
    crud_seconds=3.0,
    warmup_seconds=1.0,
    crud_users=64,
    crud_tasks_per_user=20,
    subscriber_counts=(100, 1000),
    live_seconds=6.0,
    catchup_clients=1000,
    catchup_before_seconds=2.0,
    catchup_after_seconds=4.0,
    drain_seconds=1.0,
    storm_logins=30,
    rtt_samples=300,
)
TINY = Profile(
    name="tiny",
    crud_seconds=1.0,
    warmup_seconds=0.0,
    crud_users=8,
    crud_tasks_per_user=3,
    subscriber_counts=(20,),
    live_seconds=2.0,
    catchup_clients=20,
    catchup_before_seconds=0.5,
    catchup_after_seconds=1.0,
    drain_seconds=0.5,
    storm_logins=5,
    rtt_samples=50,
    connections=8,
    settle_seconds=0.3,
)
PROFILES = {p.name: p for p in (FULL, QUICK, TINY)}
