"""docs/bench.png: event latency distributions and their timelines, CRUD throughput bars,
catch-up and the login storm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: CI and make run headless

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

CRUD_CASES = ("healthz", "retrieve", "list", "create", "patch")
PGBENCH_FOR = {"retrieve": "retrieve", "list": "list", "create": "create", "patch": "update"}


def _latency_cdf(ax: Axes, live: list[dict[str, Any]]) -> None:
    for r in live:
        points = r["distribution_ms"]
        if not points:
            continue
        fractions = [i / (len(points) - 1) for i in range(len(points))]
        style = "-" if r["transport"] == "sse" else "--"
        ax.plot(points, fractions, style, label=f"{r['subscribers']:,} {r['transport'].upper()}")
    ax.set_xscale("log")
    ax.set_xlabel("write request sent -> event received (ms, log)")
    ax.set_ylabel("fraction of deliveries")
    ax.set_title("Event latency distribution")
    ax.grid(True, which="both", alpha=0.3)
    if live:
        ax.legend(fontsize=7)


def _latency_timeline(ax: Axes, live: list[dict[str, Any]]) -> None:
    for r in live:
        if r["timeline"]:
            xs, ys = zip(*r["timeline"], strict=True)
            label = f"{r['subscribers']:,} {r['transport'].upper()}"
            ax.plot(xs, ys, "-" if r["transport"] == "sse" else "--", lw=0.8, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the write window")
    ax.set_ylabel("slowest delivery of each write (ms, log)")
    ax.set_title("Stalls over time")
    ax.grid(True, which="both", alpha=0.3)
    if live:
        ax.legend(fontsize=7)


def _throughput(ax: Axes, results: dict[str, Any]) -> None:
    crud, pg = results.get("crud", {}), results.get("pgbench", {})
    series = [
        (f"{w} worker(s)", [run.get(c, {}).get("rps", 0) for c in CRUD_CASES])
        for w, run in crud.items()
    ]
    if pg:
        series.append(
            ("pgbench", [pg.get(PGBENCH_FOR.get(c, ""), {}).get("tps", 0) for c in CRUD_CASES])
        )
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series):
        xs = [x + i * width for x in range(len(CRUD_CASES))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(
            bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=6, rotation=90
        )
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(CRUD_CASES))])
    ax.set_xticklabels(["healthz", "retrieve", "list 20", "create", "PATCH/update"])
    ax.set_yscale("log")
    ax.set_ylabel("requests (transactions) / s, log")
    ax.set_title(f"CRUD throughput, {results['profile']['connections']} connections")
    if series:
        ax.legend(fontsize=7)


def _catchup(ax: Axes, catchup: dict[str, Any] | None) -> None:
    points = (catchup or {}).get("live_after_sigterm_ms") or []
    if points:
        fractions = [i / (len(points) - 1) for i in range(len(points))]
        ax.plot([p / 1000 for p in points], fractions)
        clients = (catchup or {}).get("clients", 0)
        ax.set_title(f"Catch-up: {clients:,} SSE clients, after SIGTERM")
    ax.set_xlabel("seconds after SIGTERM")
    ax.set_ylabel("fraction of clients live again")
    ax.grid(True, alpha=0.3)


def _storm(ax: Axes, storm: dict[str, Any] | None) -> None:
    if storm and storm["healthz_timeline"]:
        xs, ys = zip(*storm["healthz_timeline"], strict=True)
        ax.plot(xs, ys, ".", ms=2)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(
            f"/healthz during {storm['logins']} logins (bcrypt {storm['bcrypt_rounds']}):"
            f" {storm['ok']} ok, {storm['rejected_503']} x 503"
        )
    ax.set_xlabel("seconds since the logins were sent")
    ax.set_ylabel("/healthz latency (ms)")
    ax.grid(True, alpha=0.3)


def _memory(ax: Axes, live: list[dict[str, Any]]) -> None:
    labels = [f"{r['subscribers']:,}\n{r['transport'].upper()}" for r in live]
    values = [r["rss_per_connection_kib"] for r in live]
    bars = ax.bar(range(len(values)), values)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("server RSS per idle connection (KiB)")
    ax.set_title("Memory per live connection")


def draw(results: dict[str, Any], path: Path) -> None:
    live = results.get("live", [])
    fig, axes = plt.subplots(3, 2, figsize=(13, 14))
    _latency_cdf(axes[0][0], live)
    _latency_timeline(axes[0][1], live)
    _throughput(axes[1][0], results)
    _memory(axes[1][1], live)
    _catchup(axes[2][0], results.get("catchup"))
    _storm(axes[2][1], results.get("storm"))
    m = results["machine"]
    fig.suptitle(
        f"taskd benchmark ({results['profile']['name']}), {results['date']}, {m['cpu_model']}"
        f" x{m['cpu_count']}, commit {m['git_commit'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
