"""The printed table: every figure of results.json that a reader compares."""

from __future__ import annotations

from typing import Any

CRUD_LABELS = {
    "healthz": "GET /healthz",
    "retrieve": "retrieve",
    "list": "list of 20",
    "create": "create",
    "patch": "PATCH",
}
PGBENCH_LABELS = {
    "retrieve": "retrieve",
    "list": "list of 20",
    "create": "create",
    "update": "update",
}


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float) and digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _crud(results: dict[str, Any], lines: list[str]) -> None:
    crud = results.get("crud", {})
    if not crud:
        return
    profile = results["profile"]
    lines.append(
        f"CRUD (wrk, {profile['connections']} connections, {profile['crud_seconds']:g} s per"
        " case; CPU: % of one core)"
    )
    head = f"{'':14}"
    for workers in crud:
        head += f"| {workers} worker(s): {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv CPU':>7} "
    lines.append(head + "| wrk CPU")
    for case, label in CRUD_LABELS.items():
        row = f"{label:14}"
        wrk_cpu = []
        for run in crud.values():
            r = run.get(case) or {}
            row += f"| {'':12}{_f(r.get('rps'), 0):>8} {_f(r.get('p50_ms'), 2):>7}"
            row += f" {_f(r.get('p99_ms'), 2):>7} {_f(r.get('server_cpu_pct'), 0):>6}% "
            wrk_cpu.append(_f(r.get("wrk_cpu_pct"), 0) + "%")
        lines.append(row + "| " + " / ".join(wrk_cpu))
    for workers, run in crud.items():
        healthz = (run.get("healthz") or {}).get("rps")
        retrieve = (run.get("retrieve") or {}).get("rps")
        if healthz and retrieve:
            lines.append(
                f"  retrieve / healthz, {workers} worker(s): {100 * retrieve / healthz:.0f}%"
            )
    if {"1", "2"} <= set(crud):
        ratios = []
        for case in ("retrieve", "list", "create", "patch"):
            one, two = (crud[w].get(case, {}).get("rps") for w in ("1", "2"))
            if one and two:
                ratios.append(f"{case} {two / one:.2f}x")
        lines.append("  2 workers / 1 worker: " + ", ".join(ratios))
    errors = sum(r.get("errors", 0) for run in crud.values() for r in run.values())
    lines.append(f"  failed requests (non-2xx, socket errors, timeouts): {errors}")


def _pgbench(results: dict[str, Any], lines: list[str]) -> None:
    pg = results.get("pgbench", {})
    if not pg:
        return
    lines.append("")
    clients = results["profile"]["connections"]
    lines.append(f"pgbench, the service's statements on the same Postgres ({clients} clients)")
    lines.append(f"{'':14}  {'tx/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
    for case, label in PGBENCH_LABELS.items():
        r = pg.get(case) or {}
        lines.append(
            f"{label:14}  {_f(r.get('tps'), 0):>8} {_f(r.get('p50_ms'), 2):>7}"
            f" {_f(r.get('p99_ms'), 2):>7}"
        )
    if results.get("pgbench_drift"):
        lines.append(
            f"  WARNING: scripts differ from taskd/store/tasks.py: {results['pgbench_drift']}"
        )


def _live(results: dict[str, Any], lines: list[str]) -> None:
    live = results.get("live", [])
    if not live:
        return
    profile = results["profile"]
    lines.append("")
    lines.append(
        f"Live: write request sent -> event received, {profile['writes_per_second']:g} writes/s"
        f" for {profile['live_seconds']:g} s, {profile['subscribers_per_user']} subscribers per"
        f" user, {profile['live_workers']} workers"
    )
    lines.append(
        f"{'subs':>6} {'':5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'events':>7}"
        f" {'lost':>4} {'dup':>3}  {'RSS/conn':>8}  {'redis/proc':>10}"
        f"  {'clients CPU/lag':>16}  {'write p99':>9}"
    )
    for r in live:
        lat = r["latency"]
        redis = r["redis_connections"]
        conns = "/".join(str(redis[k]["max_per_process"]) for k in ("idle", "open", "after"))
        clients = r["client_processes"]
        lag = f"{_f(clients['cpu_pct_max'], 0)}%/{_f(clients['loop_lag_max_ms'], 0)}ms"
        lines.append(
            f"{r['subscribers']:>6,} {r['transport'].upper():5} {_f(lat['p50_ms'], 1):>7}"
            f" {_f(lat['p99_ms'], 1):>7} {_f(lat['max_ms'], 0):>7} {r['deliveries']:>7,}"
            f" {r['lost']:>4} {r['duplicated']:>3}  {_f(r['rss_per_connection_kib'], 1):>5} KiB"
            f"  {conns:>10}  {lag:>16}  {_f(r['write_latency']['p99_ms'], 1):>6} ms"
        )
        problems = {
            k: r[k] for k in ("unexpected", "out_of_order", "resets", "reconnects") if r.get(k)
        }
        if problems or r["opened"] < r["subscribers"] or r["write_failures"]:
            lines.append(
                f"{'':13}! opened {r['opened']}/{r['subscribers']},"
                f" write failures {r['write_failures']}, {problems}"
            )
    lines.append("  redis/proc: service connections per server process, idle/open/after writes")
    rtt = results.get("redis_rtt")
    if rtt:
        lines.append(
            f"  bare Redis XADD -> XREAD: p50 {_f(rtt['p50_ms'], 2)} ms,"
            f" p99 {_f(rtt['p99_ms'], 2)} ms, max {_f(rtt['max_ms'], 2)} ms"
        )


def _catchup(results: dict[str, Any], lines: list[str]) -> None:
    c = results.get("catchup")
    if not c:
        return
    lines.append("")
    lines.append(
        f"Catch-up: {c['clients']:,} SSE clients on one replica, writes on another; the replica"
        f" gets SIGTERM (drain {c['drain_seconds']:g} s) and is started again"
    )
    lines.append(
        f"  SIGTERM -> exited {_f(c['shutdown_s'], 2)} s (streams ended at"
        f" {_f(c['streams_ended_after_sigterm_s'], 2)} s), start -> listening"
        f" {_f(c['restart_s'], 2)} s"
    )
    lines.append(
        f"  all live again {_f(c['all_live_after_serving_s'], 2)} s after it listened"
        f" (p50 {_f(c['p50_live_after_serving_s'], 2)} s), {_f(c['all_live_after_sigterm_s'], 2)} s"
        f" after SIGTERM; never reconnected {c['never_reconnected']}"
    )
    lines.append(
        f"  events {c['deliveries']:,}: lost {c['lost']}, duplicated {c['duplicated']},"
        f" resets {c['resets']}, out of order {c['out_of_order']};"
        f" failed reconnect attempts {c['connect_failures']}"
    )


def _storm(results: dict[str, Any], lines: list[str]) -> None:
    s = results.get("storm")
    if not s:
        return
    lines.append("")
    lines.append(
        f"Login storm: {s['logins']} logins at once, bcrypt cost {s['bcrypt_rounds']},"
        f" {s['workers']} workers"
    )
    lines.append(
        f"  {s['ok']} ok at {_f(s['logins_per_s'], 1)} logins/s, {s['rejected_503']} answered 503"
        f" (first after {_f(s['first_503_ms'], 0)} ms), all answered in {_f(s['seconds'], 2)} s"
    )
    waits = s["login_latency"]
    lines.append(
        f"  successful logins answered after p50 {_f(waits['p50_ms'], 0)} ms,"
        f" max {_f(waits['max_ms'], 0)} ms (auth.bcrypt_max_wait {s['bcrypt_max_wait']:g} s);"
        f" server CPU {_f(s['server_cpu_pct'], 0)}%"
    )
    before, during = s["healthz_before"], s["healthz_during"]
    lines.append(
        f"  /healthz p99 {_f(during['p99_ms'], 1)} ms (max {_f(during['max_ms'], 1)} ms,"
        f" n={during['n']}) during, {_f(before['p99_ms'], 1)} ms before"
    )


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"taskd benchmark ({results['profile']['name']}), {results['date']}:"
        f" {m['cpu_model']} x{m['cpu_count']}, {m['ram_bytes'] / 2**30:.1f} GiB,"
        f" Python {m['python']}, commit {m['git_commit'][:10]}"
        + (" + uncommitted changes" if m["git_uncommitted_changes"] else ""),
        f"load average at start {m['load_average_at_start']}; {m['servers']} Postgres"
        f" {m['postgres']} / Redis {m['redis']}",
        "",
    ]
    for part in (_crud, _pgbench, _live, _catchup, _storm):
        part(results, lines)
    if results.get("errors"):
        lines.append("")
        lines.extend(f"FAILED: {e}" for e in results["errors"])
    return "\n".join(lines)
