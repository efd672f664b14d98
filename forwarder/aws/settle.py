"""Retry an AWS call while EC2's eventual consistency hides a resource created a moment ago."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from forwarder.aws.client import AwsError
from forwarder.aws.waiter import Timing

T = TypeVar("T")

# EC2 is eventually consistent: a resource created a moment ago can still be "not found" for a few seconds.
NOT_YET = {"InvalidGroup.NotFound", "InvalidInstanceID.NotFound", "InvalidAllocationID.NotFound"}
_SETTLE_ATTEMPTS = 5


def settle(call: Callable[[], T], timing: Timing) -> T:
    """Run `call`, retrying while AWS does not see a just-created resource yet (backoff 1, 2, 4, 8 s at most)."""
    for attempt in range(_SETTLE_ATTEMPTS):
        try:
            return call()
        except AwsError as exc:
            if exc.code not in NOT_YET or attempt == _SETTLE_ATTEMPTS - 1:
                raise
            timing.sleep(min(timing.poll_s, 2.0**attempt))
    raise AssertionError("unreachable")
