"""The NAT instance's user data and systemd unit, as text, and the bootstrap script run for real with stand-ins."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from awskit import EXAMPLE_PUBLIC_IP, EXAMPLE_SHA256, REPO, TRUSTED, example_plan
from labkit import root, unique_name

from forwarder import config
from forwarder.aws import userdata
from forwarder.aws.plan import FIRST_PORT, Plan, PortForward, parse_package
from forwarder.errors import UsageError

EXAMPLE = REPO / "deploy" / "cloud-init.example.yaml"
HA_EXAMPLE = REPO / "deploy" / "cloud-init-ha.example.yaml"
ALLOCATION_ID = "eipalloc-0123456789abcdef0"
UNIT = REPO / "deploy" / "natfwd.service"
DROP_IN = REPO / "deploy" / "natfwd.service.d" / "kernel-path.conf"
NODES = [f"mycluster.abc123.{n:04d}.use1.cache.amazonaws.com" for n in (1, 2, 3)]
# What the sysctl drop-in sets on the box, exactly.
SYSCTL_SETTINGS = {"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "16384 65001"}

EXPECTED_CONFIG = f"""\
# natfwd config for ElastiCache cluster mycluster, written by natfwd provision.
engine: memcached
public_address: {EXAMPLE_PUBLIC_IP}
listen_address: 0.0.0.0
# The bootstrap script replaces this with the primary interface (ens5 on Nitro instances).
interface: eth0
allowed_clients:
  - {TRUSTED}
forwards:
  - port: 11211
    target: {NODES[0]}:11211
  - port: 11212
    target: {NODES[1]}:11211
  - port: 11213
    target: {NODES[2]}:11211
metrics:
  listen: 127.0.0.1:9108
"""


def files_of(text: str) -> dict[str, dict[str, str]]:
    document = yaml.safe_load(text)
    return {entry["path"]: entry for entry in document["write_files"]}


def test_config_text_is_exact_and_valid() -> None:
    text = userdata.render_config(example_plan(), EXAMPLE_PUBLIC_IP)
    assert text == EXPECTED_CONFIG
    cfg = config.loads(text)
    assert [(f.port, str(f.target)) for f in cfg.forwards] == [
        (11211, f"{NODES[0]}:11211"),
        (11212, f"{NODES[1]}:11211"),
        (11213, f"{NODES[2]}:11211"),
    ]


def test_example_in_deploy_is_in_sync() -> None:
    """deploy/cloud-init.example.yaml is this exact rendering; regenerate it from tests/ with
    python -c "import awskit; from forwarder.aws import userdata; print(userdata.render(awskit.example_plan(),
    awskit.EXAMPLE_PUBLIC_IP), end='')" > ../deploy/cloud-init.example.yaml"""
    assert EXAMPLE.read_text() == userdata.render(example_plan(), EXAMPLE_PUBLIC_IP)


def layout_plan(layout: str, mode: str = "userspace") -> Plan:
    """The example plan in another layout: the user data does not depend on the zones or the load balancer."""
    plan = example_plan(mode)
    request = dataclasses.replace(plan.request, ha=layout == "ha", replicas=2 if layout == "replicas" else 1)
    return dataclasses.replace(plan, request=request)


def test_ha_example_in_deploy_is_in_sync() -> None:
    """deploy/cloud-init-ha.example.yaml is this exact rendering; regenerate it from tests/ with
    python -c "import test_aws_userdata as t; from forwarder.aws import userdata; print(userdata.render(
    t.layout_plan('ha'), t.EXAMPLE_PUBLIC_IP, t.ALLOCATION_ID), end='')" > ../deploy/cloud-init-ha.example.yaml"""
    assert HA_EXAMPLE.read_text() == userdata.render(layout_plan("ha"), EXAMPLE_PUBLIC_IP, ALLOCATION_ID)


def test_userspace_user_data_is_cloud_config() -> None:
    text = userdata.render(example_plan(), EXAMPLE_PUBLIC_IP)
    assert text.startswith("#cloud-config\n")
    document = yaml.safe_load(text)
    assert document["packages"] == ["python3.11", "python3.11-pip", "gcc", "python3.11-devel"]
    assert document["runcmd"] == [["/usr/local/sbin/natfwd-bootstrap"]]
    files = files_of(text)
    assert list(files) == [userdata.CONFIG_PATH, userdata.UNIT_PATH, userdata.SYSCTL_PATH, userdata.BOOTSTRAP_PATH]
    assert files[userdata.CONFIG_PATH]["content"] == EXPECTED_CONFIG
    assert files[userdata.UNIT_PATH]["content"] == userdata.SYSTEMD_UNIT
    assert files[userdata.BOOTSTRAP_PATH]["permissions"] == "0755"
    # The config may hold an AUTH token: root only; the service reads it through LoadCredential=.
    assert files[userdata.CONFIG_PATH]["permissions"] == "0600"
    assert files[userdata.CONFIG_PATH]["owner"] == "root:root"
    assert files[userdata.BOOTSTRAP_PATH]["content"] == userdata.render_bootstrap(example_plan())


def test_kernel_user_data_runs_serve_on_the_kernel_path() -> None:
    plan = example_plan("kernel")
    text = userdata.render(plan, EXAMPLE_PUBLIC_IP)
    document = yaml.safe_load(text)
    # nft and conntrack instead of a compiler: every forward is on the kernel path. No iptables-services, whose
    # default ruleset would reject the forwarded flows.
    assert document["packages"] == ["python3.11", "python3.11-pip", "nftables", "conntrack-tools"]
    files = files_of(text)
    assert list(files) == [
        userdata.CONFIG_PATH,
        userdata.UNIT_PATH,
        userdata.KERNEL_DROP_IN_PATH,
        userdata.SYSCTL_PATH,
        userdata.BOOTSTRAP_PATH,
    ]
    assert files[userdata.UNIT_PATH]["content"] == userdata.SYSTEMD_UNIT
    assert files[userdata.KERNEL_DROP_IN_PATH]["content"] == userdata.KERNEL_DROP_IN
    assert files[userdata.KERNEL_DROP_IN_PATH]["permissions"] == "0644"
    # The same config as userspace mode (node names, re-resolved by serve), plus data_path: kernel.
    kernel_config = files[userdata.CONFIG_PATH]["content"]
    assert (
        kernel_config.replace("\ndata_path: kernel\n", "\n").replace(
            "# The kernel forwards with DNAT; natfwd keeps its nftables rules in step with the node names and the\n"
            "# config, and needs CAP_NET_ADMIN (natfwd.service.d/kernel-path.conf).\n",
            "",
        )
        == EXPECTED_CONFIG
    )
    cfg = config.loads(kernel_config)
    assert cfg.data_path == "kernel"
    assert [str(f.target) for f in cfg.forwards] == [f"{name}:11211" for name in NODES]
    # The same script as userspace mode: no static rules, the unit is started.
    script = files[userdata.BOOTSTRAP_PATH]["content"]
    assert script == userdata.render_bootstrap(example_plan()).replace("(mode userspace)", "(mode kernel)")
    assert "emit-iptables" not in text and "getent" not in text
    assert script.endswith("systemctl daemon-reload\nsystemctl enable --now natfwd.service\n")


def test_user_data_fits_the_ec2_limit_for_a_large_cluster() -> None:
    plan = example_plan()
    many = tuple(PortForward(11211 + n, plan.forwards[0].node) for n in range(40))
    text = userdata.render(dataclasses.replace(plan, forwards=many), EXAMPLE_PUBLIC_IP)
    assert len(text.encode()) < 16384  # EC2 rejects user data over 16 KB


HEALTH_FILES = [userdata.HEALTH_PATH, userdata.HEALTH_SERVICE_PATH, userdata.HEALTH_TIMER_PATH]


@pytest.mark.parametrize("layout", ["ha", "replicas"])
def test_a_group_member_runs_the_health_check(layout: str) -> None:
    text = userdata.render(layout_plan(layout), EXAMPLE_PUBLIC_IP, ALLOCATION_ID if layout == "ha" else None)
    files = files_of(text)
    assert list(files) == [
        userdata.CONFIG_PATH,
        userdata.UNIT_PATH,
        userdata.SYSCTL_PATH,
        *HEALTH_FILES,
        userdata.BOOTSTRAP_PATH,
    ]
    assert files[userdata.HEALTH_PATH]["permissions"] == "0755"
    assert files[userdata.HEALTH_PATH]["content"] == userdata.render_health(layout_plan(layout))
    assert files[userdata.HEALTH_SERVICE_PATH]["content"] == userdata.HEALTH_SERVICE
    assert files[userdata.HEALTH_TIMER_PATH]["content"] == userdata.HEALTH_TIMER
    # The same config as the single layout: the address is the Elastic IP (ha) or the load balancer's (replicas).
    assert files[userdata.CONFIG_PATH]["content"] == EXPECTED_CONFIG
    script = files[userdata.BOOTSTRAP_PATH]["content"]
    # The health check starts after natfwd: the last line.
    assert script.endswith("systemctl enable --now natfwd.service\nsystemctl enable --now natfwd-health.timer\n")
    health = files[userdata.HEALTH_PATH]["content"]
    assert "for port in 11211 11212 11213; do\n" in health
    assert 'set-instance-health --region us-east-1 --instance-id "$instance" --health-status Unhealthy' in health
    assert f'[ "$failures" -ge {userdata.HEALTH_FAILURES} ] || exit 0\n' in health


def test_ha_claims_the_address_before_natfwd_starts() -> None:
    script = userdata.render_bootstrap(layout_plan("ha"), ALLOCATION_ID)
    claim = f"until /opt/natfwd/bin/natfwd claim-address --allocation-id {ALLOCATION_ID} --region us-east-1; do\n"
    assert script.index("systemctl daemon-reload\n") < script.index(claim)
    assert script.index(claim) < script.index("systemctl enable --now natfwd.service\n")
    assert f'if [ "$tries" -ge {userdata.CLAIM_ATTEMPTS} ]; then\n' in script
    # claim-address needs boto3: natfwd's aws extra, or boto3 beside a --package.
    sdist = "/opt/natfwd/dist/natfwd-0.1.0.tar.gz"
    assert f"--disable-pip-version-check '{sdist}[aws]'\n" in script
    with_package = dataclasses.replace(layout_plan("ha"), artefact=None)
    with_package = dataclasses.replace(
        with_package, request=dataclasses.replace(with_package.request, package="natfwd==0.1.0")
    )
    assert " natfwd==0.1.0 'boto3>=1.28'\n" in userdata.render_bootstrap(with_package, ALLOCATION_ID)
    for layout in ("single", "replicas"):
        assert "boto3" not in userdata.render_bootstrap(layout_plan(layout), ALLOCATION_ID)
    # The other layouts claim nothing: a single instance gets its address from provision, replicas use the NLB's.
    for layout in ("single", "replicas"):
        assert "claim-address" not in userdata.render(layout_plan(layout), EXAMPLE_PUBLIC_IP, ALLOCATION_ID)


def test_ha_needs_the_allocation_id() -> None:
    with pytest.raises(ValueError, match="allocation_id"):
        userdata.render(layout_plan("ha"), EXAMPLE_PUBLIC_IP)


def test_the_single_layout_has_no_health_check() -> None:
    text = userdata.render(example_plan(), EXAMPLE_PUBLIC_IP)
    assert "natfwd-health" not in text and "claim-address" not in text


def test_kernel_health_check_looks_for_serves_table() -> None:
    health = userdata.render_health(layout_plan("ha", "kernel"))
    assert "    nft list table inet natfwd_serve >/dev/null 2>&1 || return 1\n" in health
    assert "ss -Hlnt" not in health


@pytest.mark.parametrize("layout", ["ha", "replicas"])
def test_group_user_data_fits_the_ec2_limit_for_a_large_cluster(layout: str) -> None:
    plan = layout_plan(layout)
    many = tuple(PortForward(11211 + n, plan.forwards[0].node) for n in range(40))
    text = userdata.render(dataclasses.replace(plan, forwards=many), EXAMPLE_PUBLIC_IP, ALLOCATION_ID)
    assert len(text.encode()) < 16384  # EC2 rejects user data over 16 KB


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ("natfwd==0.1.0", "natfwd==0.1.0"),
        ("natfwd[aws]==0.1.0", "'natfwd[aws]==0.1.0'"),
        (
            "https://example.invalid/natfwd-0.1.0-py3-none-any.whl",
            "https://example.invalid/natfwd-0.1.0-py3-none-any.whl",
        ),
    ],
)
def test_package_is_quoted_for_the_shell(spec: str, shown: str) -> None:
    script = userdata.render_bootstrap(example_plan(package=parse_package(spec)))
    assert f"pip install --no-cache-dir --disable-pip-version-check {shown}\n" in script
    assert "aws s3 cp" not in script


def test_default_bootstrap_fetches_checks_then_installs_the_artefact() -> None:
    script = userdata.render_bootstrap(example_plan())
    sdist = "/opt/natfwd/dist/natfwd-0.1.0.tar.gz"
    fetch = (
        "aws s3 cp --only-show-errors --region us-east-1 "
        f"s3://natfwd-123456789012-us-east-1-mycluster/artefacts/{EXAMPLE_SHA256}/natfwd-0.1.0.tar.gz {sdist}\n"
    )
    check = f'echo "{EXAMPLE_SHA256}  {sdist}" | sha256sum --check --strict\n'
    install = f"/opt/natfwd/bin/pip install --no-cache-dir --disable-pip-version-check {sdist}\n"
    assert script.index(fetch) < script.index(check) < script.index(install)
    assert "natfwd==" not in script


def test_git_package_installs_git() -> None:
    plan = example_plan(package=parse_package("git+https://github.com/example/natfwd@v0.1.0"))
    assert yaml.safe_load(userdata.render(plan, EXAMPLE_PUBLIC_IP))["packages"][-1] == "git"
    assert "git" not in yaml.safe_load(userdata.render(example_plan(), EXAMPLE_PUBLIC_IP))["packages"]


def sysctl_settings(text: str) -> dict[str, str]:
    """A sysctl.d file's settings as sysctl reads them: `key = value` lines, `#` and `;` lines are comments."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            key, equals, value = line.partition("=")
            assert equals, line
            settings[key.strip()] = value.strip()
    return settings


@pytest.mark.parametrize("mode", ["userspace", "kernel"])
@pytest.mark.parametrize("layout", ["single", "ha", "replicas"])
def test_user_data_applies_the_sysctl_drop_in_before_natfwd_starts(mode: str, layout: str) -> None:
    text = userdata.render(layout_plan(layout, mode), EXAMPLE_PUBLIC_IP, ALLOCATION_ID)
    files = files_of(text)
    drop_in = files[userdata.SYSCTL_PATH]
    assert userdata.SYSCTL_PATH == "/etc/sysctl.d/90-natfwd.conf"
    assert (drop_in["owner"], drop_in["permissions"]) == ("root:root", "0644")
    assert drop_in["content"] == userdata.SYSCTL_DROP_IN
    assert sysctl_settings(drop_in["content"]) == SYSCTL_SETTINGS
    # Each setting has its reason on the line above it.
    lines = drop_in["content"].splitlines()
    for key in SYSCTL_SETTINGS:
        (index,) = [i for i, line in enumerate(lines) if line.startswith(key)]
        assert lines[index - 1].startswith("# ")
    script = files[userdata.BOOTSTRAP_PATH]["content"]
    apply = f"sysctl -p {userdata.SYSCTL_PATH} || echo 'natfwd: could not apply {userdata.SYSCTL_PATH}' >&2\n"
    assert script.count(apply) == 1
    assert script.index(apply) < script.index("systemctl daemon-reload\n")
    assert script.index(apply) < script.index("systemctl enable --now natfwd.service\n")


def test_the_local_port_range_leaves_natfwds_listen_ports_out() -> None:
    """A listener cannot bind a port that a node connection (or its TIME_WAIT) holds: natfwd's ports, FIRST_PORT up
    with one per node (ElastiCache allows at most 500 in a cluster), are all below the range. The range has an even
    start and an odd end, as the kernel prefers."""
    low, high = (int(word) for word in SYSCTL_SETTINGS["net.ipv4.ip_local_port_range"].split())
    assert max(FIRST_PORT.values()) + 500 < low
    assert int(userdata.METRICS_LISTEN.rpartition(":")[2]) < low
    assert (low % 2, high % 2) == (0, 1)
    assert high - low + 1 == 48618  # the figure the drop-in's comment gives


@pytest.fixture
def namespace() -> Iterator[str]:
    """An empty network namespace of this test's own, deleted afterwards."""
    name = unique_name("natfwd-sysctl-")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _sysctl_value(namespace: str, key: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, "sysctl", "-n", key], capture_output=True, text=True, check=True, timeout=10
    )
    # sysctl prints the port range tab-separated.
    return " ".join(done.stdout.split())


@root
def test_the_sysctl_drop_in_is_valid_for_sysctl(namespace: str, tmp_path: Path) -> None:
    """The drop-in, applied with `sysctl -p` in a namespace of its own (both keys are per network namespace)."""
    path = tmp_path / "90-natfwd.conf"
    path.write_text(files_of(userdata.render(example_plan(), EXAMPLE_PUBLIC_IP))[userdata.SYSCTL_PATH]["content"])
    # A new namespace starts with the kernel's defaults, which the drop-in changes.
    for key, value in SYSCTL_SETTINGS.items():
        assert _sysctl_value(namespace, key) != value
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, "sysctl", "-p", str(path)], capture_output=True, text=True, timeout=10
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [f"{key} = {value}" for key, value in SYSCTL_SETTINGS.items()]
    for key, value in SYSCTL_SETTINGS.items():
        assert _sysctl_value(namespace, key) == value


@pytest.mark.parametrize("spec", ["natfwd; rm -rf /", "natfwd\nreboot", "natfwd 'x'", ""])
def test_package_rejects_shell_text(spec: str) -> None:
    with pytest.raises(UsageError, match="--package"):
        parse_package(spec)


# -- the bootstrap script, run for real with stand-ins for ip, getent, systemctl and `natfwd check` -------------


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A fake bin directory: `ip` reports ens5, `getent` answers 10.0.1.230+, `systemctl` and `sysctl` log their
    arguments to commands.log (this host's settings are left alone), and `natfwd` runs this checkout except `check`,
    which would probe the network."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "ip", "#!/bin/sh\necho 'default via 10.0.0.1 dev ens5 proto dhcp src 10.0.0.10 metric 512'\n")
    cases = "".join(f'  {name}) echo "10.0.1.{230 + i}     STREAM {name}" ;;\n' for i, name in enumerate(NODES))
    _executable(bin_dir / "getent", f'#!/bin/sh\ncase "$2" in\n{cases}  *) exit 2 ;;\nesac\n')
    for name in ("systemctl", "sysctl"):
        _executable(bin_dir / name, f'#!/bin/sh\necho {name} "$@" >> {tmp_path}/commands.log\n')
    _executable(
        bin_dir / "natfwd",
        f'#!/bin/sh\n[ "$1" = check ] && exit 1\nPYTHONPATH={REPO} exec {sys.executable} -m forwarder "$@"\n',
    )
    (tmp_path / "etc").mkdir()
    return tmp_path


def _run_after_install(script: str, sandbox: Path) -> subprocess.CompletedProcess[str]:
    """Run the script from the interface step on (the venv and pip steps need the network), on sandbox paths."""
    body = script[script.index("iface=") :]
    body = body.replace("/opt/natfwd/bin/natfwd", str(sandbox / "bin" / "natfwd"))
    body = body.replace("/etc/natfwd/", f"{sandbox}/etc/")
    env = {**os.environ, "PATH": f"{sandbox / 'bin'}:{os.environ['PATH']}"}
    return subprocess.run(["sh", "-c", "set -eu\n" + body], capture_output=True, text=True, env=env, timeout=60)


# What the bootstrap script runs last, in this order: the sysctl drop-in is applied before natfwd starts.
STARTED = "sysctl -p /etc/sysctl.d/90-natfwd.conf\nsystemctl daemon-reload\nsystemctl enable --now natfwd.service\n"


def test_bootstrap_scripts_are_valid_sh() -> None:
    scripts = []
    for mode in ("userspace", "kernel"):
        scripts.append(userdata.render_bootstrap(example_plan(mode)))
        for layout in ("ha", "replicas"):
            scripts.append(userdata.render_bootstrap(layout_plan(layout, mode), ALLOCATION_ID))
            scripts.append(userdata.render_health(layout_plan(layout, mode)))
    for script in scripts:
        assert script.startswith("#!/bin/sh\n")
        done = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr


def test_userspace_bootstrap_fixes_the_interface_and_starts_the_unit(sandbox: Path) -> None:
    (sandbox / "etc" / "natfwd.yaml").write_text(userdata.render_config(example_plan(), EXAMPLE_PUBLIC_IP))
    done = _run_after_install(userdata.render_bootstrap(example_plan()), sandbox)
    assert done.returncode == 0, done.stderr
    assert "natfwd: some nodes did not answer yet" in done.stderr
    assert config.load(sandbox / "etc" / "natfwd.yaml").interface == "ens5"
    assert (sandbox / "commands.log").read_text() == STARTED


def test_kernel_bootstrap_fixes_the_interface_and_starts_the_unit(sandbox: Path) -> None:
    plan = example_plan("kernel")
    (sandbox / "etc" / "natfwd.yaml").write_text(userdata.render_config(plan, EXAMPLE_PUBLIC_IP))
    done = _run_after_install(userdata.render_bootstrap(plan), sandbox)
    assert done.returncode == 0, done.stderr
    loaded = config.load(sandbox / "etc" / "natfwd.yaml")
    assert (loaded.interface, loaded.data_path) == ("ens5", "kernel")
    assert (sandbox / "commands.log").read_text() == STARTED


# -- the systemd unit ---------------------------------------------------------------------------------------------


def test_unit_in_deploy_is_the_one_the_user_data_installs() -> None:
    assert UNIT.read_text() == userdata.SYSTEMD_UNIT
    assert DROP_IN.read_text() == userdata.KERNEL_DROP_IN


def _settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_kernel_drop_in_adds_only_what_the_kernel_path_needs() -> None:
    settings = _settings(userdata.KERNEL_DROP_IN)
    assert userdata.KERNEL_DROP_IN.splitlines()[1] == "[Service]"
    assert settings == {
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE CAP_NET_ADMIN"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE CAP_NET_ADMIN"],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX AF_NETLINK"],
        "ExecStartPre": ["+/usr/sbin/sysctl -qw net.ipv4.ip_forward=1"],
    }
    # The unit stays as it was: still a dynamic user, still sandboxed, /proc/sys still read-only for natfwd.
    unit = _settings(userdata.SYSTEMD_UNIT)
    assert unit["DynamicUser"] == ["yes"] and unit["ProtectKernelTunables"] == ["yes"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]


def test_unit_hardening() -> None:
    settings = _settings(userdata.SYSTEMD_UNIT)
    assert settings["Restart"] == ["always"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["DynamicUser"] == ["yes"]
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["KillSignal"] == ["SIGTERM"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(settings["LimitNOFILE"][0]) >= 65536
    assert float(settings["TimeoutStopSec"][0]) > config.DEFAULTS["drain_timeout_s"]
    assert settings["Type"] == ["notify"]
    assert settings["LoadCredential"] == [f"natfwd.yaml:{userdata.CONFIG_PATH}"]
    assert settings["ExecStart"] == [f"{userdata.VENV}/bin/natfwd serve --config credential:natfwd.yaml"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian package systemd)")
def test_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at /bin/true, the only change.
    unit = tmp_path / "natfwd.service"
    unit.write_text(userdata.SYSTEMD_UNIT.replace(f"{userdata.VENV}/bin/natfwd", "/bin/true"))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    # An exposure of at most 1.8 out of 10 ("OK"); the threshold is in tenths.
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=18", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-2000:]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian package systemd)")
def test_health_units_pass_systemd_analyze(tmp_path: Path) -> None:
    (tmp_path / "natfwd-health.service").write_text(userdata.HEALTH_SERVICE.replace(userdata.HEALTH_PATH, "/bin/true"))
    (tmp_path / "natfwd-health.timer").write_text(userdata.HEALTH_TIMER)
    units = [str(tmp_path / "natfwd-health.service"), str(tmp_path / "natfwd-health.timer")]
    done = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # natfwd.service is not here: the only complaint allowed is that After= names a unit it cannot find.
    assert all("natfwd.service" in line for line in done.stderr.splitlines()), done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian package systemd)")
def test_unit_with_kernel_drop_in_passes_systemd_analyze(tmp_path: Path) -> None:
    unit = tmp_path / "natfwd.service"
    unit.write_text(userdata.SYSTEMD_UNIT.replace(f"{userdata.VENV}/bin/natfwd", "/bin/true"))
    (tmp_path / "natfwd.service.d").mkdir()
    (tmp_path / "natfwd.service.d" / "kernel-path.conf").write_text(userdata.KERNEL_DROP_IN)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60
    )
    # The drop-in is read (CAP_NET_ADMIN and netlink are scored), and the unit stays "OK": at most 2.1 out of 10.
    assert "✗ CapabilityBoundingSet=~CAP_NET_ADMIN" in done.stdout, done.stdout[-3000:]
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=21", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-2000:]


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="needs cloud-init (Debian package cloud-init)")
@pytest.mark.parametrize("layout", ["ha", "replicas"])
def test_group_user_data_passes_cloud_init_schema(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "user-data"
    path.write_text(userdata.render(layout_plan(layout), EXAMPLE_PUBLIC_IP, ALLOCATION_ID))
    done = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Valid cloud-config:")
