"""Boot a NAT instance's user data in a lab namespace: a cloud-init stand-in, and dnf/systemctl stand-ins.

`python bootkit.py box ROOT` runs as root inside the lab's NAT network namespace and a private mount namespace
(`ip netns exec NAT unshare --mount --propagation private`): it lays writable overlays on /etc, /opt and /usr/local
whose upper layers live in a tmpfs under ROOT, so nothing the box writes reaches this host's files, then does what
cloud-init does with ROOT/user-data: packages (through the dnf stand-in), write_files, runcmd.
`python bootkit.py systemctl ARGS` is the systemctl the box sees: `enable --now NAME.service` reads the unit and its drop-ins
(UNIT.d/*.conf), runs each ExecStartPre (as root: the box has no sandbox to step out of for `+`), then starts
ExecStart as systemd would for Type=notify (LoadCredential= copies into $CREDENTIALS_DIRECTORY, $NOTIFY_SOCKET,
waiting for READY=1), records its pid in ROOT/service.pid and leaves it running; other commands (a timer's
`enable --now` too) are only recorded.
The service keeps only the capabilities of CapabilityBoundingSet (still uid 0: the stand-in has no DynamicUser), and
ProtectKernelTunables=yes makes /proc/sys read-only for it alone, so a missing capability or sysctl step fails here
as it would under systemd.
`python bootkit.py record NAME ARGS` is dnf, yum and service: recorded in ROOT/commands.log, nothing installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

OVERLAID = ("/etc", "/opt", "/usr/local")
READY_TIMEOUT_S = 120.0  # only stops a hang


def _record(root: Path, words: list[str]) -> None:
    with (root / "commands.log").open("a") as log:
        log.write(" ".join(words) + "\n")


def box(root: Path) -> int:
    scratch = root / "scratch"
    scratch.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "box", str(scratch)], check=True)
    for directory in OVERLAID:
        name = directory.strip("/").replace("/", "-")
        upper, work = scratch / f"{name}.upper", scratch / f"{name}.work"
        upper.mkdir()
        work.mkdir()
        options = f"lowerdir={directory},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, directory], check=True)
    # The VPC's DNS, for the node endpoint names.
    shutil.copyfile(root / "hosts", "/etc/hosts")
    document = yaml.safe_load((root / "user-data").read_text())
    packages = document.get("packages") or []
    if packages:
        subprocess.run(["dnf", "install", "-y", *packages], check=True)
    for entry in document.get("write_files") or []:
        path = Path(entry["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(entry["content"])
        owner, _, group = entry.get("owner", "root:root").partition(":")
        shutil.chown(path, owner, group or owner)
        path.chmod(int(entry.get("permissions", "0644"), 8))
    for command in document.get("runcmd") or []:
        argv = command if isinstance(command, list) else ["sh", "-c", command]
        done = subprocess.run([str(word) for word in argv])
        if done.returncode != 0:
            return done.returncode
    return 0


def _unit(path: Path) -> dict[str, list[str]]:
    """The [Service] settings of the unit at `path` and of its drop-ins, in the order systemd reads them: each
    assignment appends to the key's list and an empty one clears it, as for systemd's list settings."""
    settings: dict[str, list[str]] = {}
    for part in [path, *sorted(path.with_name(path.name + ".d").glob("*.conf"))]:
        section = ""
        for line in part.read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", ";")):
                continue
            if stripped.startswith("["):
                section = stripped.strip("[]")
                continue
            if section == "Service" and "=" in stripped:
                key, _, value = stripped.partition("=")
                if value:
                    settings.setdefault(key, []).append(value)
                else:
                    settings.pop(key, None)
    return settings


def _capabilities(unit: dict[str, list[str]]) -> list[str]:
    """CapabilityBoundingSet= as setpriv names (cap_net_admin -> net_admin); its assignments are merged."""
    names = sorted({word for value in unit.get("CapabilityBoundingSet", []) for word in value.split()})
    assert all(name.startswith("CAP_") for name in names), names
    ambient = {word for value in unit.get("AmbientCapabilities", []) for word in value.split()}
    assert ambient <= set(names), f"AmbientCapabilities {sorted(ambient)} outside the bounding set {names}"
    return [name.removeprefix("CAP_").lower() for name in names]


def _sandboxed(unit: dict[str, list[str]], argv: list[str]) -> list[str]:
    """`argv` with the unit's capabilities only, and /proc/sys read-only under ProtectKernelTunables=yes."""
    if "CapabilityBoundingSet" in unit:
        caps = ",".join(["-all", *(f"+{name}" for name in _capabilities(unit))])
        argv = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *argv]
    if unit.get("ProtectKernelTunables") == ["yes"]:
        remount = 'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"'
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", remount, "sh", *argv]
    return argv


def _exec_start_pre(root: Path, unit: dict[str, list[str]]) -> int:
    for line in unit.get("ExecStartPre", []):
        command = line.lstrip("+-!@:")
        prefixes = line[: len(line) - len(command)]
        done = subprocess.run(shlex.split(command), stdin=subprocess.DEVNULL, capture_output=True, text=True)
        _record(root, ["ExecStartPre", line, f"exit={done.returncode}"])
        if done.returncode != 0 and "-" not in prefixes:
            print(f"natfwd.service: ExecStartPre {line} failed: {done.stderr}", file=sys.stderr)
            return 1
    return 0


def systemctl(root: Path, args: list[str]) -> int:
    _record(root, ["systemctl", *args])
    if args[:2] != ["enable", "--now"] or not args[2].endswith(".service"):
        return 0
    unit = _unit(Path("/etc/systemd/system") / args[2])
    assert unit["Type"] == ["notify"], unit.get("Type")
    if _exec_start_pre(root, unit) != 0:
        return 1
    credentials = root / "scratch" / "credentials"
    credentials.mkdir(mode=0o700)
    for spec in unit.get("LoadCredential", []):
        name, _, source = spec.partition(":")
        target = credentials / name
        shutil.copyfile(source, target)
        target.chmod(0o400)
    notify_path = root / "scratch" / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(1.0)
        env = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials), "NOTIFY_SOCKET": str(notify_path)}
        (exec_start,) = unit["ExecStart"]
        with (root / "service.log").open("ab") as log:
            service = subprocess.Popen(
                _sandboxed(unit, shlex.split(exec_start)), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd="/", start_new_session=True,
            )  # fmt: skip
        (root / "service.pid").write_text(str(service.pid))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if service.poll() is not None:
                print(f"natfwd.service exited with {service.returncode} before READY=1", file=sys.stderr)
                return 1
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                continue
            _record(root, ["notify", *message.splitlines()])
            if "READY=1" in message.splitlines():
                return 0
    print("natfwd.service did not send READY=1", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    command, root = argv[0], Path(os.environ["BOOTKIT_ROOT"])
    if command == "box":
        return box(root)
    if command == "systemctl":
        return systemctl(root, argv[1:])
    _record(root, argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
