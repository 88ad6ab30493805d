"""The parent's side of the subscriber processes (bench/load.py): start them, drive them
through the measured window, collect what they received, and judge it."""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing
from collections import Counter
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from bench import load
from bench.accounts import Account, Writer
from bench.deploy import Stack
from bench.stats import distribution_ms, summary_ms

REPLY_TIMEOUT = 180.0  # opening 2,500 connections on a loaded 2-core machine; not a goal


class Fleet:
    """Subscriber processes holding `per_user` connections for each of `accounts`."""

    def __init__(
        self,
        stack: Stack,
        url: str,
        transport: str,
        accounts: list[Account],
        per_user: int,
        max_per_process: int,
    ) -> None:
        subs = [
            load.Subscription(i * per_user + k, a.index, a.token, f"{a.seq}-0")
            for i, a in enumerate(accounts)
            for k in range(per_user)
        ]
        # Several processes even below their capacity: one process would be the bottleneck
        # of the connection storm, and a user's subscribers then sit in different processes.
        count = max(1, min(4, math.ceil(len(subs) / 250)), math.ceil(len(subs) / max_per_process))
        context = multiprocessing.get_context("spawn")  # no fork of a process with a loop
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for p in range(count):
            parent, child = context.Pipe()
            spec = load.Spec(url, transport, subs[p::count])
            process = context.Process(target=load.main, args=(child, spec), daemon=True)
            self.pipes.append(parent)
            self.processes.append(process)
            stack.children.append(process)
        self.size = len(subs)

    async def _replies(self, kind: str) -> list[Any]:
        async def one(pipe: Connection) -> Any:
            if not await asyncio.to_thread(pipe.poll, REPLY_TIMEOUT):
                raise RuntimeError(f"a subscriber process sent no {kind!r} in time")
            reply = pipe.recv()
            if reply[0] != kind:
                raise RuntimeError(f"subscriber process: expected {kind!r}, got {reply[0]!r}")
            return reply[1]

        return list(await asyncio.gather(*(one(p) for p in self.pipes)))

    async def open(self) -> dict[str, Any]:
        """Start the processes; return once each has opened its connections."""
        for process in self.processes:
            process.start()
        replies = await self._replies("opened")
        return {
            "processes": len(self.processes),
            "opened": sum(r["opened"] for r in replies),
            "open_seconds": round(max(r["seconds"] for r in replies), 2),
        }

    def go(self) -> None:
        for pipe in self.pipes:
            pipe.send(("go",))

    async def expect(self, last: dict[int, int], wait: float) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            pipe.send(("expect", last, wait))
        return await self._replies("results")

    async def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(("close",))
        for process in self.processes:
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5)


def judge(replies: list[dict[str, Any]], writer: Writer) -> dict[str, Any]:
    """Latency from each write request to each delivery, and whether every subscriber got
    every event of its user exactly once and in order."""
    sent = writer.sent_times()
    expected: dict[int, set[int]] = {}
    for (account, seq), _ in sent.items():
        expected.setdefault(account, set()).add(seq)
    started = min((w.sent for w in writer.writes), default=0.0)
    latencies: list[float] = []
    worst_per_write: dict[tuple[int, int], float] = {}
    lost = duplicated = unexpected = out_of_order = resets = reauths = reconnects = 0
    failures: Counter[str] = Counter()
    missing: Counter[tuple[int, int]] = Counter()  # (account, seq) -> subscribers that lacked it
    for reply in replies:
        for client in reply["clients"]:
            account = client["account"]
            seqs = [seq for seq, _ in client["received"]]
            mine = expected.get(account, set())
            lost += len(mine - set(seqs))
            missing.update((account, seq) for seq in mine - set(seqs))
            duplicated += len(seqs) - len(set(seqs))
            unexpected += len(set(seqs) - mine)  # e.g. a write that failed yet committed
            out_of_order += sum(b <= a for a, b in itertools.pairwise(seqs))
            resets += client["resets"]
            reauths += client["reauths"]
            reconnects += max(0, len(client["opens"]) - 1)
            failures.update(client["failures"])
            for seq, at in client["received"]:
                if (account, seq) in sent:
                    latency = at - sent[account, seq]
                    latencies.append(latency)
                    key = (account, seq)
                    worst_per_write[key] = max(worst_per_write.get(key, 0.0), latency)
    timeline = sorted(
        (round(sent[key] - started, 3), round(value * 1000, 2))
        for key, value in worst_per_write.items()
    )
    stats = [r["stats"] for r in replies]
    return {
        "deliveries": len(latencies),
        "latency": summary_ms(latencies),
        "distribution_ms": distribution_ms(latencies),
        "timeline": timeline,  # per write: (seconds into the window, slowest delivery ms)
        "lost": lost,
        "duplicated": duplicated,
        "unexpected": unexpected,
        "out_of_order": out_of_order,
        "resets": resets,
        "reauths": reauths,
        "reconnects": reconnects,
        "connect_failures": dict(failures),
        # The first lost events: the write's time into the window, and how many missed it.
        "lost_sample": [
            {"account": a, "seq": q, "sent_s": round(sent[a, q] - started, 3), "missed_by": n}
            for (a, q), n in sorted(missing.items(), key=lambda item: sent[item[0]])[:20]
        ],
        "client_processes": {
            "count": len(stats),
            "cpu_pct_max": max((s["cpu_pct"] for s in stats), default=None),
            "loop_lag_p99_ms_max": max((s["loop_lag_p99_ms"] or 0 for s in stats), default=None),
            "loop_lag_max_ms": max((s["loop_lag_max_ms"] or 0 for s in stats), default=None),
            "max_rss_kib": max((s["max_rss_kib"] for s in stats), default=None),
        },
    }
