"""The node's one deadline rule (agentd.deadlines): the caller's time, else the default,
never past the maximum."""

from __future__ import annotations

import asyncio
import math

import pytest

from agentd.deadlines import DeadlinePolicy
from agentd.errors import DeadlineExceeded, InvalidArgument


def test_the_caller_s_time_else_the_default_never_past_the_maximum():
    policy = DeadlinePolicy(default_s=10.0, max_s=30.0)
    assert policy.timeout(None) == 10.0
    assert policy.timeout(2.5) == 2.5
    assert policy.timeout(60.0) == 30.0
    assert DeadlinePolicy(default_s=10.0).timeout(3600.0) == 3600.0
    assert DeadlinePolicy().timeout(None) is None  # nothing configured: unbounded


@pytest.mark.parametrize("spent", [0.0, -1.0, math.nan])
def test_a_time_already_up_is_deadline_exceeded(spent):
    with pytest.raises(DeadlineExceeded, match="deadline passed before the call"):
        DeadlinePolicy(default_s=10.0).timeout(spent)


def test_the_deadline_is_absolute_on_the_given_clock():
    policy = DeadlinePolicy(default_s=10.0, max_s=30.0)
    assert policy.deadline(None, now=100.0) == 110.0
    assert policy.deadline(60.0, now=100.0) == 130.0
    assert DeadlinePolicy().deadline(None, now=100.0) is None


async def test_the_deadline_defaults_to_the_loop_s_clock():
    now = asyncio.get_running_loop().time()
    deadline = DeadlinePolicy(default_s=5.0).deadline(None)
    assert deadline is not None and now + 5.0 <= deadline < now + 6.0


@pytest.mark.parametrize(
    ("default_s", "max_s", "needle"),
    [(0.0, None, "default_s"), (None, -1.0, "max_s"), (20.0, 10.0, "longer than the maximum")],
)
def test_a_policy_that_cannot_hold_is_refused(default_s, max_s, needle):
    with pytest.raises(InvalidArgument, match=needle):
        DeadlinePolicy(default_s, max_s)


def test_settings_refuse_a_default_longer_than_the_maximum():
    from pydantic import ValidationError

    from agentd.settings import Settings

    longer = r"default_timeout_s \(60\) is longer than max_timeout_s"
    with pytest.raises(ValidationError, match=longer):
        Settings(default_timeout_s=60, max_timeout_s=5)
    assert Settings(default_timeout_s=None, max_timeout_s=5).max_timeout_s == 5


def test_an_update_changes_the_policy_in_place_or_not_at_all():
    policy = DeadlinePolicy(default_s=10.0, max_s=30.0)
    policy.update(2.0, 5.0)
    assert (policy.timeout(None), policy.timeout(60.0)) == (2.0, 5.0)
    policy.update(None, None)
    assert policy.timeout(None) is None and policy.timeout(600.0) == 600.0
    with pytest.raises(InvalidArgument, match="longer than the maximum"):
        policy.update(20.0, 10.0)
    assert policy == DeadlinePolicy()  # unchanged by the refused update
