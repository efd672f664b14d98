"""The NAT instance's cloud-init user data: fetch and verify natfwd, install it, write its config, then run it
(or apply kernel rules).

The systemd unit text lives here so the package can ship it; deploy/natfwd.service is a copy that a test keeps
equal, and deploy/cloud-init.example.yaml is a rendered example that a test keeps in sync.
"""

from __future__ import annotations

import shlex
import textwrap

from forwarder.aws.plan import Plan

CONFIG_PATH = "/etc/natfwd/natfwd.yaml"
UNIT_PATH = "/etc/systemd/system/natfwd.service"
BOOTSTRAP_PATH = "/usr/local/sbin/natfwd-bootstrap"
RULES_PATH = "/etc/natfwd/rules.sh"
KERNEL_CONFIG_PATH = "/etc/natfwd/kernel.yaml"
VENV = "/opt/natfwd"
DIST_DIR = "/opt/natfwd/dist"
METRICS_LISTEN = "127.0.0.1:9108"
# The config may hold an AUTH token: root-only on disk, handed to the service by systemd (LoadCredential=).
CONFIG_CREDENTIAL = "natfwd.yaml"

SYSTEMD_UNIT = """\
[Unit]
Description=natfwd: forward public ports to ElastiCache nodes
After=network-online.target
Wants=network-online.target

[Service]
# natfwd says READY=1 once every listener is bound, RELOADING=1 on SIGHUP and STOPPING=1 when it drains.
Type=notify
# The config and TLS keys stay root-only (0600): systemd copies them into $CREDENTIALS_DIRECTORY for the
# service's throwaway user. In the config, credential:NAME is a file there, e.g. `key: credential:tls.key` with
# LoadCredential=tls.key:/etc/natfwd/tls.key. A changed config takes effect on restart, not on reload.
LoadCredential=natfwd.yaml:/etc/natfwd/natfwd.yaml
ExecStart=/opt/natfwd/bin/natfwd serve --config credential:natfwd.yaml
ExecReload=/bin/kill -HUP $MAINPID
KillSignal=SIGTERM
# SIGTERM drains live connections for drain_timeout_s (30 s by default) before exiting; SIGKILL only after that.
TimeoutStopSec=45
Restart=always
RestartSec=2
LimitNOFILE=1048576

# No root: a throwaway user that may bind ports below 1024 and nothing more.
DynamicUser=yes
# /var/lib/natfwd, writable by that user: for discovery.state_file (each node's port across restarts).
StateDirectory=natfwd
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def render_config(plan: Plan, public_ip: str) -> str:
    """The natfwd YAML config for this cluster: one forward per node, targets are the node endpoint names."""
    lines = [
        f"# natfwd config for ElastiCache cluster {plan.cluster_id}, written by natfwd provision.",
        f"engine: {plan.cluster.engine}",
        f"public_address: {public_ip}",
        "listen_address: 0.0.0.0",
        "# The bootstrap script replaces this with the primary interface (ens5 on Nitro instances).",
        "interface: eth0",
        "allowed_clients:",
        *(f"  - {cidr}" for cidr in plan.request.trusted_cidrs),
        "forwards:",
    ]
    for forward in plan.forwards:
        lines += [f"  - port: {forward.port}", f"    target: {forward.node.address}:{forward.node.port}"]
    lines += ["metrics:", f"  listen: {METRICS_LISTEN}"]
    return "\n".join(lines) + "\n"


def _install_lines(plan: Plan) -> list[str]:
    """Fetch natfwd from the cluster's bucket with the instance role, check its sha256, install it."""
    pip = f"{VENV}/bin/pip install --no-cache-dir --disable-pip-version-check"
    artefact = plan.artefact
    if artefact is None:
        return [f"{pip} {shlex.quote(str(plan.request.package))}"]
    path = f"{DIST_DIR}/{artefact.filename}"
    return [
        "# natfwd as provision built it, read with the instance role; installed only if its sha256 matches.",
        f"mkdir -p {DIST_DIR}",
        f"aws s3 cp --only-show-errors --region {plan.region} {artefact.url} {path}",
        f'echo "{artefact.sha256}  {path}" | sha256sum --check --strict',
        f"{pip} {path}",
    ]


def render_bootstrap(plan: Plan) -> str:
    """The first-boot shell script: install natfwd in a venv, fix the interface name, then serve or apply rules."""
    lines = [
        "#!/bin/sh",
        f"# natfwd first-boot setup for ElastiCache cluster {plan.cluster_id} (mode {plan.request.mode}).",
        "set -eu",
        f"python3.11 -m venv {VENV}",
        *_install_lines(plan),
        f"ln -sf {VENV}/bin/natfwd /usr/local/bin/natfwd",
        "# Amazon Linux 2023 names the primary interface ens5 (Nitro) or enX0 (Xen), not eth0.",
        "iface=$(ip -o -4 route show default | awk '{print $5; exit}')",
        f'sed -i "s/^interface: .*/interface: ${{iface}}/" {CONFIG_PATH}',
        "# The page's step 3: every node must answer from here (logged; a node still starting is not fatal).",
        f"{VENV}/bin/natfwd check --config {CONFIG_PATH} --direct || echo 'natfwd: some nodes did not answer yet' >&2",
    ]
    if plan.request.mode == "kernel":
        names = " ".join(sorted({f.node.address for f in plan.forwards}))
        lines += [
            "# Kernel rules need IP addresses: resolve the node names (VPC DNS) into a copy of the config.",
            f"install -m 0600 {CONFIG_PATH} {KERNEL_CONFIG_PATH}",
            f"for name in {names}; do",
            "  ip=$(getent ahostsv4 \"$name\" | awk '{print $1; exit}')",
            '  [ -n "$ip" ] || { echo "natfwd: cannot resolve $name" >&2; exit 1; }',
            f'  sed -i "s/target: $name:/target: $ip:/" {KERNEL_CONFIG_PATH}',
            "done",
            f"{VENV}/bin/natfwd emit-iptables --config {KERNEL_CONFIG_PATH} --save amazon-linux > {RULES_PATH}",
            f"sh {RULES_PATH}",
        ]
    else:
        lines += ["systemctl daemon-reload", "systemctl enable --now natfwd.service"]
    return "\n".join(lines) + "\n"


def _file(path: str, permissions: str, content: str) -> str:
    return (
        f"  - path: {path}\n"
        "    owner: root:root\n"
        f'    permissions: "{permissions}"\n'
        "    content: |\n" + textwrap.indent(content, "      ")
    )


def render(plan: Plan, public_ip: str) -> str:
    """The complete #cloud-config user data for the NAT instance of `plan`, whose Elastic IP is `public_ip`."""
    packages = ["python3.11", "python3.11-pip"]
    if plan.request.mode == "kernel":
        packages.append("iptables-services")
    else:
        # pip builds natfwd's C extensions (the relay thread, the protocol scanners) with these; without them
        # natfwd still serves, in pure Python, at a few microseconds more per request.
        packages += ["gcc", "python3.11-devel"]
    if plan.artefact is None and str(plan.request.package).startswith("git+"):
        packages.append("git")
    parts = [
        "#cloud-config\n",
        f"# natfwd NAT instance for ElastiCache cluster {plan.cluster_id} ({plan.cluster.engine}, "
        f"mode {plan.request.mode}), written by natfwd provision.\n",
        "# Its security group allows outbound HTTPS (443): dnf, pip, S3 (natfwd itself) and SSM Session Manager.\n",
        "packages:\n",
        *(f"  - {name}\n" for name in packages),
        "write_files:\n",
        _file(CONFIG_PATH, "0600", render_config(plan, public_ip)),
    ]
    if plan.request.mode == "userspace":
        parts.append(_file(UNIT_PATH, "0644", SYSTEMD_UNIT))
    parts += [
        _file(BOOTSTRAP_PATH, "0755", render_bootstrap(plan)),
        "runcmd:\n",
        f"  - [{BOOTSTRAP_PATH}]\n",
    ]
    return "".join(parts)
