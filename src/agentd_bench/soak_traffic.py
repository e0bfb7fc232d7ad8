"""The soak's load generator: mixed traffic against a running agentd, in a process of its own.

:mod:`agentd_bench.soak` spawns one or more of these so that their event loops and GIL are
not the server's. A generator says ``ready`` once its modules are imported, waits for the
start time (``time.monotonic``, the same clock in every process on Linux), then runs either
a closed-loop ramp (fixed numbers in flight, to find the mix's capacity) or an open-loop run
(arrivals at a fixed rate, a request never waits for another) that reports every sampling
window over its pipe. Every request is bounded by a timeout (:mod:`agentd_bench.soak_requests`)
and the number in flight by ``max_in_flight``: an arrival past it is counted as ``not_sent``,
never queued.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from agentd_bench.soak_requests import Outcome, Target, Traffic, Window

__all__ = ["RampPlan", "SoakPlan", "boundaries", "generator_main"]


@dataclass(frozen=True, slots=True)
class RampPlan:
    """Closed loop: ``warmup_s`` at ``levels[0]`` in flight, then ``level_s`` per level."""

    levels: tuple[int, ...]
    level_s: float
    warmup_s: float
    seed: int


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """Open loop at ``rate`` arrivals/s for ``duration_s``, a report every ``interval_s``."""

    rate: float
    duration_s: float
    interval_s: float
    seed: int
    max_in_flight: int = 256
    swarm_agents: int = 0  # 0: this generator runs no swarm
    swarm_in_flight: int = 64
    swarm_first_s: float = 30.0
    swarm_every_s: float = 60.0


def boundaries(duration_s: float, interval_s: float) -> list[float]:
    """Window ends, in seconds from the start: every ``interval_s``, the last at the end."""
    ends: list[float] = []
    k = 1
    while k * interval_s < duration_s - 1e-9:
        ends.append(k * interval_s)
        k += 1
    ends.append(duration_s)
    return ends


# ---------------------------------------------------------------- the two modes


async def _closed_loop(traffic: Traffic, end: float, window: Window, done: list[int]) -> None:
    """One request after another until ``end``; ``done[0]`` counts those answered by then."""
    while time.monotonic() < end:
        outcome = await traffic.attempt(traffic.pick(), lambda: window)
        if time.monotonic() <= end and outcome in (Outcome.OK, Outcome.CUT):
            done[0] += 1


async def _ramp(traffic: Traffic, plan: RampPlan, start_at: float) -> list[dict[str, Any]]:
    """Closed loop: each level keeps its number of requests in flight until its end time
    (the same absolute times in every generator, so their levels line up)."""
    phases = [(plan.levels[0], plan.warmup_s, False)]
    phases += [(level, plan.level_s, True) for level in plan.levels]
    levels: list[tuple[int, float, Window, list[int]]] = []
    begin = start_at
    async with asyncio.TaskGroup() as tg:
        for in_flight, seconds, counted in phases:
            end = begin + seconds
            window, done = Window(), [0]
            await asyncio.sleep(max(0.0, begin - time.monotonic()))
            for _ in range(in_flight):
                tg.create_task(_closed_loop(traffic, end, window, done))
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            if counted:
                levels.append((in_flight, seconds, window, done))
            begin = end
    # After the task group, stragglers have ended too: the windows are complete.
    return [
        {"in_flight": n, "seconds": s, "completed": done[0], "window": w.to_dict()}
        for n, s, w, done in levels
    ]


class SoakRunner:
    """Open loop: arrivals every ``1/rate`` s, each kind drawn by weight; swarms on schedule."""

    def __init__(self, traffic: Traffic, plan: SoakPlan, start_at: float, conn: Connection):
        self.traffic, self.plan, self.start_at, self.conn = traffic, plan, start_at, conn
        self.window = Window()
        self.in_flight = 0
        self.swarms: list[dict[str, Any]] = []

    def current(self) -> Window:
        return self.window

    async def run(self) -> None:
        end = self.start_at + self.plan.duration_s
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._report_windows())
            if self.plan.swarm_agents > 0:
                tg.create_task(self._swarms(end))
            await self._arrivals(tg, end)
        # Every request has ended (each is bounded by its timeout): the rest of the counts.
        self.conn.send({"type": "done", "drain": self.window.to_dict(), "swarms": self.swarms})

    async def _arrivals(self, tg: asyncio.TaskGroup, end: float) -> None:
        interval = 1.0 / self.plan.rate
        n = 0
        await asyncio.sleep(max(0.0, self.start_at - time.monotonic()))
        while True:
            now = time.monotonic()
            if now >= end:
                return
            due = self.start_at + n * interval
            if due > now:
                await asyncio.sleep(due - now)
                continue
            # Behind schedule (this process was busy): send what is due now, no burst limit
            # beyond max_in_flight, and record how late the sends were.
            self.window.max_schedule_lag_s = max(self.window.max_schedule_lag_s, now - due)
            kind = self.traffic.pick()
            if self.in_flight >= self.plan.max_in_flight:
                self.window.kind(kind).add("not_sent")
            else:
                self.in_flight += 1
                tg.create_task(self._one(kind))
            n += 1

    async def _one(self, kind: str) -> None:
        try:
            await self.traffic.attempt(kind, self.current)
        finally:
            self.in_flight -= 1

    async def _report_windows(self) -> None:
        for index, offset in enumerate(boundaries(self.plan.duration_s, self.plan.interval_s)):
            await asyncio.sleep(max(0.0, self.start_at + offset - time.monotonic()))
            window, self.window = self.window, Window()
            report = window.to_dict()
            # A thread sends it: a big window can fill the pipe, and the loop must not wait.
            await asyncio.to_thread(
                self.conn.send,
                {
                    "type": "window",
                    "index": index,
                    "in_flight": self.in_flight,
                    "connections": self.traffic.num_connections,
                    **report,
                },
            )

    async def _swarms(self, end: float) -> None:
        """Swarm rounds: ``swarm_agents`` echo agents called at once (``swarm_in_flight`` at a
        time), like a periodic job fanning out to many agents."""
        plan = self.plan
        round_index = 0
        while (at := self.start_at + plan.swarm_first_s + round_index * plan.swarm_every_s) < end:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            gate = asyncio.Semaphore(plan.swarm_in_flight)
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(self._swarm_member(i, gate) for i in range(plan.swarm_agents))
            )
            self.swarms.append(
                {
                    "t_s": round(at - self.start_at, 2),
                    "agents": plan.swarm_agents,
                    "ok": sum(o is Outcome.OK for o in outcomes),
                    "wall_s": round(time.monotonic() - started, 3),
                }
            )
            round_index += 1

    async def _swarm_member(self, i: int, gate: asyncio.Semaphore) -> Outcome:
        # The same agents every round, as a recurring job would address them.
        async with gate:
            return await self.traffic.attempt(
                "swarm", self.current, lambda n: self.traffic.invoke_grpc(f"echo/swarm-{i}", n)
            )


async def _run(conn: Connection, target: Target, plan: RampPlan | SoakPlan, start_at: float):
    traffic = Traffic(target, plan.seed)
    try:
        if isinstance(plan, RampPlan):
            conn.send({"type": "ramp", "levels": await _ramp(traffic, plan, start_at)})
        else:
            await SoakRunner(traffic, plan, start_at, conn).run()
    finally:
        await traffic.aclose()


def generator_main(conn: Connection, target: Target, plan: RampPlan | SoakPlan) -> None:
    """Process entry point: import, say ready, wait for the start time, run, report."""
    try:
        import grpc  # noqa: F401 - imported before "ready" so start-up is not measured

        conn.send({"type": "ready"})
        start_at = conn.recv()
        asyncio.run(_run(conn, target, plan, start_at))
    except (KeyboardInterrupt, EOFError):
        pass
    except BaseException:
        conn.send({"type": "error", "message": traceback.format_exc()[-3000:]})
        raise
    finally:
        conn.close()
