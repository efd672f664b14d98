"""The `natfwd` command group: parse arguments, call the library, render, and map errors to exit codes."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from forwarder import __version__
from forwarder.errors import NatfwdError, UsageError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]
CONFIG_ENV = "NATFWD_CONFIG"
SHELLS = ("bash", "zsh", "fish")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it tells something: not None or false, and not when the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default:" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors print in the same `natfwd: error:` form as every other error, and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"natfwd: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def config_path(args: argparse.Namespace) -> str:
    """--config, else $NATFWD_CONFIG, else /etc/natfwd/natfwd.yaml."""
    from forwarder.config import DEFAULT_PATH

    given: str | None = args.config
    return given or os.environ.get(CONFIG_ENV) or DEFAULT_PATH


def _not_available(feature: str) -> NatfwdError:
    return NatfwdError(f"{feature} is not available in this version of natfwd yet")


def _cmd_serve(args: argparse.Namespace) -> int:
    from forwarder import config, fdlimit, notify, worker

    path = config_path(args)
    cfg = config.load(path)
    log = logging.getLogger("natfwd.config")
    for warning in config.warnings(cfg):
        log.warning(warning)
    fdlimit.raise_fd_limit(cfg.max_connections)  # once, here: forked workers inherit the limit
    if cfg.workers == 1:
        worker.run_worker(cfg, path, reuse_port=False, export_metrics=True, on_ready=notify.ready)
        return EXIT_OK
    from forwarder import supervisor

    supervisor.run(cfg, path, target=worker.run_worker)
    return EXIT_OK


def _cmd_emit_iptables(args: argparse.Namespace) -> int:
    from forwarder import config, iptables

    text = iptables.render(config.load(config_path(args)), args.format, args.save)
    sys.stdout.write(text)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from forwarder import check, config

    results = check.run(config.load(config_path(args)), direct=args.direct, timeout_s=args.timeout)
    for result in results:
        print(check.format_result(result), flush=True)
    failed = check.summary(results)
    if failed is not None:
        print(f"natfwd: error: {failed}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_lab(args: argparse.Namespace) -> int:
    from forwarder import lab

    if args.action == "up":
        if args.standby:
            from forwarder import labfailover

            made = labfailover.up(args.name, args.engine, args.mode)
            print(lab.describe_up(made, labfailover.describe_standby(made)))
        else:
            print(lab.describe_up(lab.up(args.name, args.engine, args.mode)))
        return EXIT_OK
    if args.action == "failover":
        from forwarder import labfailover

        print(labfailover.describe_failover(labfailover.failover(args.name)))
        return EXIT_OK
    if args.action == "down":
        deleted = lab.down(args.name)
        print(f"lab {args.name}: removed {', '.join(deleted)}" if deleted else f"lab {args.name}: nothing to remove")
        return EXIT_OK
    status = lab.status(args.name)
    print(lab.describe_status(status))
    if not status.namespaces:
        return EXIT_FAILURE
    from forwarder import check

    results = lab.check(status)
    for result in results:
        print(check.format_result(result))
    failed = check.summary(results)
    if failed is not None:
        print(f"natfwd: error: lab {args.name}: {failed}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_provision(args: argparse.Namespace) -> int:
    from forwarder.aws import commands

    return commands.provision(args, sys.stdin, sys.stdout, sys.stderr)


def _cmd_destroy(args: argparse.Namespace) -> int:
    from forwarder.aws import commands

    return commands.destroy_resources(args, sys.stdin, sys.stdout, sys.stderr)


def _cmd_claim_address(args: argparse.Namespace) -> int:
    from forwarder.aws import claim

    print(claim.run(args.allocation_id, args.instance_id, args.region, args.endpoint_url).describe())
    return EXIT_OK


def _cmd_completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["natfwd"], shell=args.shell))
    return EXIT_OK


CONFIG_HELP = f"YAML config file (default: ${CONFIG_ENV}, else /etc/natfwd/natfwd.yaml)"

EXAMPLES = {
    "natfwd": """\
examples:
  natfwd serve                                  # /etc/natfwd/natfwd.yaml, or $NATFWD_CONFIG
  natfwd serve --config natfwd.yaml --debug
  natfwd emit-iptables --format nft | nft -f -
  natfwd check --direct                         # on the NAT box: probe each node
  sudo natfwd lab up --engine redis
  natfwd provision --cluster-id mycluster --trusted-cidr 198.51.100.27/32 --dry-run
  source <(natfwd completion bash)              # or zsh; fish: natfwd completion fish | source

Global options (--debug, --log-format) go before or after the command.""",
    "serve": """\
examples:
  natfwd serve --config /etc/natfwd/natfwd.yaml
  NATFWD_CONFIG=natfwd.yaml natfwd serve --log-format json
  kill -HUP $(pidof -s natfwd)    # reload the config; SIGTERM drains and exits""",
    "emit-iptables": """\
examples:
  natfwd emit-iptables --config natfwd.yaml | sudo sh
  natfwd emit-iptables --format restore | sudo iptables-restore --noflush
  natfwd emit-iptables --format nft --save debian""",
    "check": """\
examples:
  natfwd check --config natfwd.yaml              # from the trusted client, through public_address
  natfwd check --direct --timeout 1               # on the NAT box, straight to each node""",
    "lab": """\
examples:
  sudo natfwd lab up                    # memcached nodes, natfwd serve in the NAT namespace
  sudo natfwd lab up --engine redis --mode kernel
  sudo natfwd lab status
  sudo natfwd lab up --standby --name ha && sudo natfwd lab failover --name ha
  sudo natfwd lab down""",
    "provision": """\
examples:
  natfwd provision --cluster-id mycluster --trusted-cidr 198.51.100.27/32 --dry-run
  natfwd provision --cluster-id mycluster --trusted-cidr 198.51.100.27/32 --region us-east-1 --yes
  natfwd provision --cluster-id mycluster --trusted-cidr 198.51.100.27/32 --ha \\
      --package natfwd==0.1.0 --output cloudformation > natfwd.yaml
  aws cloudformation deploy --stack-name natfwd-mycluster --template-file natfwd.yaml \\
      --capabilities CAPABILITY_NAMED_IAM""",
    "destroy": """\
examples:
  natfwd destroy --cluster-id mycluster --region us-east-1""",
    "claim-address": """\
examples:
  natfwd claim-address --allocation-id eipalloc-0123456789abcdef0 --region us-east-1   # on the instance
  natfwd claim-address --allocation-id eipalloc-0123456789abcdef0 --instance-id i-0123456789abcdef0""",
    "completion": """\
examples:
  source <(natfwd completion bash)                       # this shell; add it to ~/.bashrc to keep it
  natfwd completion zsh > "${fpath[1]}/_natfwd"
  natfwd completion fish > ~/.config/fish/completions/natfwd.fish""",
}


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--debug and --log-format, on the top parser (with defaults) and on each command (without, so that one given
    before the command is not reset by the command's parser)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="show tracebacks and debug logs",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text" if defaults else argparse.SUPPRESS,
        help="log line format on stderr (default: text)",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = _Parser(
        prog="natfwd",
        description="Reach an Amazon ElastiCache cluster from outside its VPC through a NAT instance.",
        epilog=EXAMPLES["natfwd"],
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"natfwd {__version__}")
    _global_options(parser, defaults=True)
    common = _Parser(add_help=False)
    _global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(
        name: str,
        handler: Handler,
        help_text: str,
        description: str | None = None,
        parents: Sequence[_Parser] = (),
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=description or help_text,
            epilog=EXAMPLES.get(name),
            formatter_class=formatter,
            parents=[*parents, common],
        )
        sub.set_defaults(handler=handler)
        return sub

    serve = command(
        "serve",
        _cmd_serve,
        "Run the userspace forwarder in the foreground. SIGTERM drains and exits 0; SIGHUP reloads the config.",
    )
    serve.add_argument("--config", metavar="PATH", help=CONFIG_HELP + "; see config.example.yaml")

    emit = command("emit-iptables", _cmd_emit_iptables, "Print the equivalent kernel DNAT rules to stdout.")
    emit.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    emit.add_argument(
        "--format",
        choices=("commands", "restore", "nft"),
        default="commands",
        help="commands: idempotent POSIX sh; restore: iptables-restore --noflush input; nft: nft -f input",
    )
    emit.add_argument(
        "--save",
        choices=("amazon-linux", "debian"),
        default=None,
        help="append the step that persists the rules across reboots on this OS family",
    )

    check = command(
        "check",
        _cmd_check,
        "Probe every forward through public_address (run on the trusted client); exit 1 if any fails.",
    )
    check.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    check.add_argument("--direct", action="store_true", help="probe each target node instead (run on the NAT box)")
    check.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS", help="per-probe timeout")

    lab = command("lab", _cmd_lab, "Build the page's topology on this host with network namespaces (needs root).")
    lab.add_argument(
        "action",
        choices=("up", "down", "status", "failover"),
        help="up: build and start; down: remove everything; failover: kill the NAT holding the public address, "
        "move the address to the other NAT (needs up --standby)",
    )
    lab.add_argument("--name", default="natfwd", help="lab name; namespaces are prefixed with it so labs never collide")
    lab.add_argument("--engine", choices=("memcached", "redis"), default="memcached", help="cache nodes to run")
    lab.add_argument("--mode", choices=("userspace", "kernel"), default="userspace", help="natfwd serve or kernel DNAT")
    lab.add_argument(
        "--standby", action="store_true", help="up: add a second NAT namespace running natfwd, for `lab failover`"
    )

    aws_common = _Parser(add_help=False)
    aws_common.add_argument(
        "--cluster-id", required=True, metavar="ID", help="ElastiCache cluster or replication group"
    )
    aws_common.add_argument("--region", default=None, help="AWS region (default: the AWS config's, as boto3 finds it)")
    aws_common.add_argument("--profile", default=None, help="AWS named profile")
    aws_common.add_argument("--endpoint-url", default=None, metavar="URL", help="any AWS-compatible endpoint")
    aws_common.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    provision = command(
        "provision",
        _cmd_provision,
        "Create the NAT instance, security groups and Elastic IP for a cluster.",
        "Create the NAT instance, security groups and Elastic IP for a cluster, then print the endpoints.",
        parents=[aws_common],
    )
    provision.add_argument(
        "--trusted-cidr",
        required=True,
        action="append",
        metavar="CIDR",
        help="a client network let in (IPv4 or IPv6); repeat for several; run provision again to change them",
    )
    provision.add_argument(
        "--mode",
        choices=("userspace", "kernel"),
        default="userspace",
        help="natfwd serve on the relay, or on the kernel path (data_path: kernel, nftables)",
    )
    provision.add_argument("--instance-type", default="t4g.micro", help="EC2 instance type of the NAT box")
    provision.add_argument(
        "--architecture",
        choices=("arm64", "x86_64"),
        default=None,
        help="AMI architecture (default: the instance type's); a mismatch with --instance-type is an error",
    )
    provision.add_argument("--key-name", default=None, help="EC2 key pair for SSH; port 22 is opened only with it")
    provision.add_argument("--dry-run", action="store_true", help="print the plan and create nothing")
    layout = provision.add_mutually_exclusive_group()
    layout.add_argument(
        "--ha",
        action="store_true",
        help="an Auto Scaling group of one over two or more zones; a replacement claims the Elastic IP",
    )
    layout.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="N (2 or more) instances behind a Network Load Balancer with one Elastic IP per zone",
    )
    provision.add_argument(
        "--output",
        choices=("text", "cloudformation"),
        default="text",
        help="text: plan, then create; cloudformation: print the plan as a CloudFormation template (YAML) and "
        "create nothing (needs --package: the stack's instances pip-install it)",
    )
    provision.add_argument("--subnet-id", default=None, help="public subnet to use (default: the first public one)")
    provision.add_argument(
        "--package",
        default=None,
        metavar="SPEC",
        help="what the instance pip-installs instead of this natfwd (stored in a private S3 bucket by default): "
        "a release, a wheel URL or a git+https URL",
    )
    provision.add_argument(
        "--wait-timeout", type=float, default=600.0, metavar="SECONDS", help="how long to wait for the instance"
    )

    command(
        "destroy",
        _cmd_destroy,
        "Remove everything provision created, found by tags.",
        "Remove everything provision created for a cluster, found by its tags, in dependency order.",
        parents=[aws_common],
    )

    claim = command(
        "claim-address",
        _cmd_claim_address,
        "Associate an Elastic IP with this instance, taking it from any other; what an --ha instance runs at boot.",
        "Associate an Elastic IP with this instance (its id from IMDSv2 unless --instance-id), taking it from any "
        "other instance. Idempotent: an address already here is left alone.",
    )
    claim.add_argument("--allocation-id", required=True, metavar="ID", help="the Elastic IP's allocation id")
    claim.add_argument(
        "--instance-id", default=None, metavar="ID", help="the instance (default: this one, from IMDSv2)"
    )
    claim.add_argument(
        "--region", default=None, help="AWS region (default: the AWS config's, else this instance's from IMDSv2)"
    )
    claim.add_argument("--endpoint-url", default=None, metavar="URL", help="any AWS-compatible endpoint")

    completion = command(
        "completion",
        _cmd_completion,
        "Print the shell completion script for bash, zsh or fish.",
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    return parser


def _os_error_hint(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "; is another natfwd or memcached already listening on that port?"
    if exc.errno == errno.EACCES:
        return "; ports below 1024 need root or CAP_NET_BIND_SERVICE"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "; listen_address must be an address of this host (or 0.0.0.0)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `natfwd` console script; returns the exit code."""
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # a completion request from the shell: answers on fd 8, then exits
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    from forwarder import logs

    logs.setup(args.log_format, logging.DEBUG if args.debug else logging.INFO)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        if args.debug:
            traceback.print_exc()
        for line in str(exc).splitlines() or [""]:  # a config error: one line per problem
            print(f"natfwd: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except NatfwdError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"natfwd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"natfwd: error: {exc}{_os_error_hint(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
