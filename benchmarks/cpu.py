"""CPU time from /proc: a process tree's user and system seconds, and the whole machine's busy seconds."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Cpu:
    """Seconds of CPU: user and system for a process tree, or busy (all but idle and iowait) for the machine."""

    user_s: float = 0.0
    sys_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.user_s + self.sys_s

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user_s + other.user_s, self.sys_s + other.sys_s)

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user_s - other.user_s, self.sys_s - other.sys_s)


def parse_stat(text: str) -> tuple[Cpu, Cpu]:
    """/proc/PID/stat -> (the process's own time, its reaped children's time)."""
    # The command name (field 2) may hold spaces and parentheses; everything after its last ')' is plain.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(fields[i]) * TICK_S for i in (11, 12, 13, 14))
    return Cpu(utime, stime), Cpu(cutime, cstime)


def parse_proc_stat(text: str) -> Cpu:
    """/proc/stat's first line -> the machine's busy time: user+nice as user; system, irq, softirq, steal as sys."""
    name, *values = text.splitlines()[0].split()
    assert name == "cpu", f"unexpected /proc/stat: {name}"
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) * TICK_S for v in values[:8])
    return Cpu(user + nice, system + irq + softirq + steal)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def tree(pids: Iterable[int]) -> Cpu:
    """CPU time of `pids` and all their descendants, live or already reaped; a process gone meanwhile counts 0."""
    total = Cpu()
    for pid in pids:
        try:
            own, reaped = parse_stat(Path(f"/proc/{pid}/stat").read_text())
            kids = _children(pid)
        except (OSError, ValueError):
            continue
        total = total + own + reaped + tree(kids)
    return total


def machine() -> Cpu:
    return parse_proc_stat(Path("/proc/stat").read_text())
