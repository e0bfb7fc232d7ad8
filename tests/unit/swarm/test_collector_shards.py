"""The swarm's sharded collector: each shard counts its own share of the agents, a run is
done only when every shard has heard from all of its agents, and a report twice or to
the wrong shard is caught (the run's "every agent reported exactly once" check)."""

from __future__ import annotations

import asyncio

import pytest

from agentd.agents import AgentRegistry
from agentd.cluster.placement import Placement
from agentd.runtime import MemoryStateStore, WorkerPool
from agentd.swarm.agents import SwarmRun, Tally, shard_address
from agentd.swarm.host import SwarmHost
from agentd.swarm.multi import collector_shards

SHARDS = tuple(shard_address(f"c{j}") for j in range(3))


@pytest.fixture
async def started():
    hosts: list[SwarmHost] = []

    async def start(run: SwarmRun) -> SwarmHost:
        registry = AgentRegistry()
        registry.register(run.decider_type)
        registry.register(run.collector_type)
        host = SwarmHost(registry, MemoryStateStore(), pool=WorkerPool(4, 64))
        await host.start()
        hosts.append(host)
        return host

    yield start
    for host in hosts:
        await host.aclose()


async def _settled(host: SwarmHost) -> None:
    while host.gauges()["messages_waiting"] or host.pool.statistics().busy:
        await asyncio.sleep(0.001)


async def test_done_when_every_shard_heard_from_all_of_its_agents(started):
    run = SwarmRun(10, SHARDS)  # shard j: agents j, j+3, ... (4, 3 and 3 of them)
    host = await started(run)
    assert [run.expected(j) for j in range(3)] == [4, 3, 3]
    for i in range(10):
        if i != 7:  # shard 1 still waits for agent 7
            assert host.tell_nowait(SHARDS[i % 3], (i, i % 4))
    await _settled(host)
    assert not run.done.is_set()
    assert run.tally(host) == Tally(9, 0, (3, 3, 2, 1))
    assert host.tell_nowait(SHARDS[1], (7, 3))
    await asyncio.wait_for(run.done.wait(), 5)
    assert run.tally(host) == Tally(10, 0, (3, 3, 2, 2))
    assert run.finished_at > 0


async def test_a_second_report_or_one_to_the_wrong_shard_is_a_duplicate(started):
    run = SwarmRun(6, SHARDS)
    host = await started(run)
    host.tell_nowait(SHARDS[0], (0, 0))
    host.tell_nowait(SHARDS[0], (0, 0))  # agent 0 again
    host.tell_nowait(SHARDS[0], (4, 1))  # agent 4 belongs to shard 1
    await _settled(host)
    tally = run.tally(host)
    assert tally.distinct == 1 and tally.duplicates == 2
    # Agent 4's stray report did not count for shard 1: it still waits for it.
    host.tell_nowait(SHARDS[1], (1, 0))
    await _settled(host)
    assert run.tally(host).distinct == 2 and not run.done.is_set()


def test_shards_of_one_process_are_only_its_own():
    run = SwarmRun(10, SHARDS, local=SHARDS[1:2])
    assert run.local == (SHARDS[1],) and not run.done.is_set()
    # Fewer agents than shards: a process whose shards expect nothing is done at once.
    idle = SwarmRun(2, SHARDS, local=SHARDS[2:])
    assert idle.done.is_set()


@pytest.mark.parametrize("processes", [1, 2, 3, 4, 7, 16])
def test_each_process_owns_the_same_number_of_shards(processes):
    placement = Placement.spread([f"p{i}" for i in range(processes)])
    for per_node in (1, 2):
        shards = collector_shards(placement, per_node)
        assert len(shards) == len(set(shards)) == processes * per_node
        owners = [placement.owner(a) for a in shards]
        assert sorted(owners) == sorted([f"p{i}" for i in range(processes)] * per_node)
        # i % K spreads the reports evenly: consecutive shards are on different processes.
        assert owners[:processes] == sorted(set(owners))
        assert collector_shards(placement, per_node) == shards  # the same in every process
