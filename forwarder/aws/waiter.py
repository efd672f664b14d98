"""Wait for EC2 instances to reach a state, reporting progress while they get there."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from forwarder.aws.client import AwsClient, AwsError

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Timing:
    """How long to wait and how often to look; tests shorten it."""

    timeout_s: float = 600.0
    poll_s: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic


def wait_for_instances(
    client: AwsClient, instance_ids: Sequence[str], target: str, progress: Progress, timing: Timing
) -> None:
    """Poll until every instance is in `target` ("running" or "terminated").

    Raises AwsError when an instance ends in another final state (a launch that failed goes to "terminated"),
    or when `timing.timeout_s` passes first.
    """
    if not instance_ids:
        return
    start = timing.clock()
    while True:
        found = client.describe_instances({"instance-id": list(instance_ids)})
        states = {str(i["InstanceId"]): str(i["State"]["Name"]) for i in found}
        pending = {iid: states.get(iid, "unknown") for iid in instance_ids if states.get(iid) != target}
        if not pending:
            progress(f"instance {', '.join(instance_ids)} is {target}")
            return
        if target == "running" and any(
            state in ("shutting-down", "terminated", "stopped") for state in pending.values()
        ):
            stuck = ", ".join(f"{iid} is {state}" for iid, state in pending.items())
            raise AwsError(f"instance did not start: {stuck}; see its console output in the EC2 console")
        elapsed = timing.clock() - start
        summary = ", ".join(f"{iid} {state}" for iid, state in sorted(pending.items()))
        progress(f"waiting for {target}: {summary} ({elapsed:.0f} s)")
        if elapsed >= timing.timeout_s:
            raise AwsError(f"gave up after {timing.timeout_s:.0f} s waiting for {summary} to become {target}")
        timing.sleep(timing.poll_s)
