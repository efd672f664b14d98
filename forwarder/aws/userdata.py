"""The NAT instance's cloud-init user data: fetch and verify natfwd, install it, write its config, then run it.

The systemd unit text and its kernel-path drop-in live here so the package can ship them; deploy/natfwd.service
and deploy/natfwd.service.d/kernel-path.conf are copies that a test keeps equal, and
deploy/cloud-init.example.yaml (and cloud-init-ha.example.yaml, for --ha) are rendered examples that a test keeps in
sync. The box's sysctl drop-in (TIME_WAIT reuse, a wider local port range) is written and applied before natfwd
starts. In an Auto Scaling group (--ha, --replicas) the box also runs a health check that reports it unhealthy to
the group when natfwd stays down, and with --ha it claims the Elastic IP before natfwd starts.
"""

from __future__ import annotations

import shlex
import textwrap

from forwarder.aws.plan import Plan
from forwarder.iptables import SERVE_TABLE

CONFIG_PATH = "/etc/natfwd/natfwd.yaml"
UNIT_PATH = "/etc/systemd/system/natfwd.service"
BOOTSTRAP_PATH = "/usr/local/sbin/natfwd-bootstrap"
KERNEL_DROP_IN_PATH = "/etc/systemd/system/natfwd.service.d/kernel-path.conf"
SYSCTL_PATH = "/etc/sysctl.d/90-natfwd.conf"
VENV = "/opt/natfwd"
DIST_DIR = "/opt/natfwd/dist"
METRICS_LISTEN = "127.0.0.1:9108"
HEALTH_PATH = "/usr/local/sbin/natfwd-health"
HEALTH_SERVICE_PATH = "/etc/systemd/system/natfwd-health.service"
HEALTH_TIMER_PATH = "/etc/systemd/system/natfwd-health.timer"
HEALTH_STATE_PATH = "/run/natfwd-health.failures"
# The health check runs every HEALTH_PERIOD_S; HEALTH_FAILURES checks failed in a row mark the instance
# unhealthy, so natfwd down is reported after (HEALTH_FAILURES - 1) to HEALTH_FAILURES periods: 60 to 90 s. One
# failed check is not enough: a restart by systemd (RestartSec=2) can be caught in the middle.
HEALTH_PERIOD_S = 30
HEALTH_FAILURES = 3
# --ha: claim-address is tried this many times, CLAIM_PAUSE_S apart (about 5 minutes), before the box gives up.
CLAIM_ATTEMPTS = 30
CLAIM_PAUSE_S = 10

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

# What `data_path: kernel` needs on top of the unit: nft and conntrack work over netlink with CAP_NET_ADMIN, and
# forwarding must be on while ProtectKernelTunables keeps /proc/sys read-only for the service itself.
KERNEL_DROP_IN = """\
# natfwd.service for data_path: kernel (or auto): serve programs nftables and reads conntrack.
[Service]
AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_ADMIN
CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN
# nft and conntrack talk to the kernel over netlink.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
# ProtectKernelTunables keeps /proc/sys read-only for natfwd; `+` runs this one line outside the sandbox.
ExecStartPre=+/usr/sbin/sysctl -qw net.ipv4.ip_forward=1
"""

# Connection churn (a new connection per request): the relay closes its side to the node first, so each node
# connection leaves a TIME_WAIT socket on the box for 60 s, and the default 28232 ports (32768-60999) allow about
# 28232 / 60 = 470 new connections per second to one node address:port before connect() fails with EADDRNOTAVAIL.
# tcp_tw_reuse=1 lets a connect take a TIME_WAIT port again once its last TCP timestamp is 1 s old. The range starts
# above natfwd's listen ports (6379 or 11211 up, one per node, and ElastiCache has at most 500 nodes): connect()
# skips a port a listener holds, but a listener cannot bind (EADDRINUSE) a port that a node connection or its
# TIME_WAIT holds, so a restart under churn could fail for 60 s. An even start and an odd end, as the kernel's own
# default: connect() takes even ports and bind() odd ones, and the kernel warns about a range of one parity.
SYSCTL_DROP_IN = """\
# natfwd: more new connections per second to each cache node (natfwd-bootstrap applies it before natfwd starts).
# Each node connection natfwd closes waits 60 s in TIME_WAIT: connects may reuse one after 1 s (TCP timestamps).
net.ipv4.tcp_tw_reuse = 1
# 48618 ports per node address:port instead of 28232, all above natfwd's listen ports, so a restart can bind them.
net.ipv4.ip_local_port_range = 16384 65001
"""


HEALTH_SERVICE = """\
[Unit]
Description=natfwd health check: report this instance unhealthy to its Auto Scaling group when natfwd stays down
After=natfwd.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/natfwd-health
"""

HEALTH_TIMER = f"""\
[Unit]
Description=natfwd health check every {HEALTH_PERIOD_S} s (natfwd-health.service)

[Timer]
OnActiveSec={HEALTH_PERIOD_S}s
OnUnitActiveSec={HEALTH_PERIOD_S}s
AccuracySec=1s

[Install]
WantedBy=timers.target
"""


def render_config(plan: Plan, public_ip: str) -> str:
    """The natfwd YAML config for this cluster: one forward per node, targets are the node endpoint names."""
    lines = [
        f"# natfwd config for ElastiCache cluster {plan.cluster_id}, written by natfwd provision.",
        f"engine: {plan.cluster.engine}",
        f"public_address: {public_ip}",
        "listen_address: 0.0.0.0",
    ]
    if plan.request.mode == "kernel":
        lines += [
            "# The kernel forwards with DNAT; natfwd keeps its nftables rules in step with the node names and the",
            "# config, and needs CAP_NET_ADMIN (natfwd.service.d/kernel-path.conf).",
            "data_path: kernel",
        ]
    lines += [
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
    # --ha: claim-address calls EC2 with boto3, natfwd's aws extra.
    ha = plan.layout == "ha"
    artefact = plan.artefact
    if artefact is None:
        return [f"{pip} {shlex.quote(str(plan.request.package))}" + (" 'boto3>=1.28'" if ha else "")]
    path = f"{DIST_DIR}/{artefact.filename}"
    return [
        "# natfwd as provision built it, read with the instance role; installed only if its sha256 matches.",
        f"mkdir -p {DIST_DIR}",
        f"aws s3 cp --only-show-errors --region {plan.region} {artefact.url} {path}",
        f'echo "{artefact.sha256}  {path}" | sha256sum --check --strict',
        f"{pip} {shlex.quote(path + '[aws]') if ha else path}",
    ]


def render_health(plan: Plan) -> str:
    """The health check natfwd-health.timer runs: after HEALTH_FAILURES failed checks in a row, it reports this
    instance Unhealthy to its Auto Scaling group (SetInstanceHealth), which replaces it.

    A check fails when natfwd.service is not active, or when natfwd's data path is gone: a forward's listener
    (userspace) or serve's nftables table (kernel). A cache node that is down does not fail it: a new NAT box would
    not bring the node back, and every box would be replaced in turn.
    """
    if plan.request.mode == "kernel":
        data_path = [
            "    # The kernel forwards: serve's own nftables table must be there.",
            f"    nft list table inet {SERVE_TABLE} >/dev/null 2>&1 || return 1",
        ]
    else:
        ports = " ".join(str(forward.port) for forward in plan.forwards)
        data_path = [
            "    # Every forward's listener is bound (checked without connecting: a probe from here would be refused by",
            "    # the allowlist and counted in natfwd_connections_rejected_total).",
            f"    for port in {ports}; do",
            '        ss -Hlnt "sport = :$port" | grep -q LISTEN || return 1',
            "    done",
        ]
    token_header = "X-aws-ec2-metadata-token"
    lines = [
        "#!/bin/sh",
        f"# natfwd health check for cluster {plan.cluster_id}, run every {HEALTH_PERIOD_S} s by natfwd-health.timer. "
        f"After {HEALTH_FAILURES} failed",
        "# checks in a row it reports this instance Unhealthy to its Auto Scaling group, which replaces it. systemd",
        "# restarts a crashed natfwd itself (Restart=always); this is for a natfwd that cannot come back.",
        "set -u",
        f"state={HEALTH_STATE_PATH}",
        "# NATFWD_IMDS_URL: for tests only, a stand-in for the instance metadata service.",
        'imds="${NATFWD_IMDS_URL:-http://169.254.169.254}"',
        "",
        "healthy() {",
        "    systemctl is-active --quiet natfwd.service || return 1",
        *data_path,
        "}",
        "",
        "if healthy; then",
        '    echo 0 > "$state"',
        "    exit 0",
        "fi",
        'failures=$(( $(cat "$state" 2>/dev/null || echo 0) + 1 ))',
        'echo "$failures" > "$state"',
        f'echo "natfwd-health: natfwd is down ($failures failed checks in a row, unhealthy at {HEALTH_FAILURES})" >&2',
        f'[ "$failures" -ge {HEALTH_FAILURES} ] || exit 0',
        "# IMDSv2: a session token first, then the instance id.",
        f"token=$(curl -fsS --noproxy '*' --max-time 2 -X PUT -H '{token_header}-ttl-seconds: 300' "
        '"$imds/latest/api/token") || exit 1',
        f"instance=$(curl -fsS --noproxy '*' --max-time 2 -H \"{token_header}: $token\" "
        '"$imds/latest/meta-data/instance-id") || exit 1',
        'echo "natfwd-health: reporting $instance Unhealthy to its Auto Scaling group" >&2',
        f'exec aws autoscaling set-instance-health --region {plan.region} --instance-id "$instance" '
        "--health-status Unhealthy",
    ]
    return "\n".join(lines) + "\n"


def _claim_lines(plan: Plan, allocation_id: str) -> list[str]:
    """--ha: take the Elastic IP (from a dead predecessor, if any) before natfwd starts, retried for a while."""
    claim = f"{VENV}/bin/natfwd claim-address --allocation-id {shlex.quote(allocation_id)} --region {plan.region}"
    return [
        "# The Elastic IP clients allow-list, taken from the instance this one replaces. Retried: the old association",
        "# and the role's credentials can lag. Without it the box is useless: after the last try the health check is",
        "# started without natfwd, so it reports this instance unhealthy and the group replaces it.",
        "tries=0",
        f"until {claim}; do",
        "    tries=$((tries + 1))",
        f'    if [ "$tries" -ge {CLAIM_ATTEMPTS} ]; then',
        "        echo 'natfwd: could not claim the Elastic IP; natfwd-health will report this instance unhealthy' >&2",
        "        systemctl enable --now natfwd-health.timer",
        "        exit 1",
        "    fi",
        f"    sleep {CLAIM_PAUSE_S}",
        "done",
    ]


def render_bootstrap(plan: Plan, allocation_id: str | None = None) -> str:
    """The first-boot shell script: install natfwd in a venv, fix the interface name, apply the sysctl drop-in, then
    start natfwd.service.

    With --ha (which needs `allocation_id`) it claims the Elastic IP first; in an Auto Scaling group it then
    starts the health check. Raises ValueError for the ha layout without an allocation id.
    """
    if plan.layout == "ha" and allocation_id is None:
        raise ValueError("the ha layout's user data needs the Elastic IP's allocation_id")
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
        "# TIME_WAIT reuse and more ports for natfwd's node connections. systemd-sysctl applies /etc/sysctl.d at every",
        "# later boot, but on this first one it ran before cloud-init wrote the file. Without it natfwd still serves.",
        f"sysctl -p {SYSCTL_PATH} || echo 'natfwd: could not apply {SYSCTL_PATH}' >&2",
        "systemctl daemon-reload",
    ]
    if allocation_id is not None and plan.layout == "ha":
        lines += _claim_lines(plan, allocation_id)
    lines.append("systemctl enable --now natfwd.service")
    if plan.layout != "single":
        lines.append("systemctl enable --now natfwd-health.timer")
    return "\n".join(lines) + "\n"


def _file(path: str, permissions: str, content: str) -> str:
    return (
        f"  - path: {path}\n"
        "    owner: root:root\n"
        f'    permissions: "{permissions}"\n'
        "    content: |\n" + textwrap.indent(content, "      ")
    )


def render(plan: Plan, public_ip: str, allocation_id: str | None = None) -> str:
    """The complete #cloud-config user data for the NAT instance of `plan`, whose Elastic IP is `public_ip`.

    The ha layout needs `allocation_id`, the Elastic IP each instance claims at boot (ValueError without it).
    """
    packages = ["python3.11", "python3.11-pip"]
    if plan.request.mode == "kernel":
        # nft for serve's table; conntrack for natfwd_connections_active (/proc/net/nf_conntrack is root-only).
        packages += ["nftables", "conntrack-tools"]
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
    parts.append(_file(UNIT_PATH, "0644", SYSTEMD_UNIT))
    if plan.request.mode == "kernel":
        parts.append(_file(KERNEL_DROP_IN_PATH, "0644", KERNEL_DROP_IN))
    parts.append(_file(SYSCTL_PATH, "0644", SYSCTL_DROP_IN))
    if plan.layout != "single":
        parts += [
            _file(HEALTH_PATH, "0755", render_health(plan)),
            _file(HEALTH_SERVICE_PATH, "0644", HEALTH_SERVICE),
            _file(HEALTH_TIMER_PATH, "0644", HEALTH_TIMER),
        ]
    parts += [
        _file(BOOTSTRAP_PATH, "0755", render_bootstrap(plan, allocation_id)),
        "runcmd:\n",
        f"  - [{BOOTSTRAP_PATH}]\n",
    ]
    return "".join(parts)
