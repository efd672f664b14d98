"""The provision and destroy commands, called by the CLI: the plan on stdout, questions and progress on stderr.

This is command-line code that lives here so that cli.py stays free of boto3 and of AWS details.
"""

from __future__ import annotations

import argparse
import shlex
from typing import TextIO

from forwarder.aws import apply, destroy, inventory, plan, plantext, report, survey
from forwarder.aws.client import AwsClient
from forwarder.aws.waiter import Progress, Timing
from forwarder.errors import NatfwdError, UsageError


def _progress(stderr: TextIO) -> Progress:
    def show(message: str) -> None:
        print(f"natfwd: {message}", file=stderr, flush=True)

    return show


def _confirm(question: str, stdin: TextIO | None, stderr: TextIO, action: str) -> None:
    """Ask on the terminal; no answer (no stdin, or EOF) counts as no. Raises NatfwdError unless the answer is yes."""
    print(f"{question} [y/N] ", end="", file=stderr, flush=True)
    try:
        answer = stdin.readline() if stdin is not None else ""
    except (OSError, ValueError):
        answer = ""
    if not answer:
        print(file=stderr)
        raise NatfwdError(f"no answer on standard input, so nothing was done; pass --yes to {action} without asking")
    if answer.strip().lower() not in ("y", "yes"):
        raise NatfwdError("not confirmed; nothing was done")


def destroy_command(args: argparse.Namespace, region: str) -> str:
    """The exact `natfwd destroy` command that removes what provision made with these arguments."""
    words = ["natfwd", "destroy", "--cluster-id", args.cluster_id, "--region", region]
    if args.profile:
        words += ["--profile", args.profile]
    if args.endpoint_url:
        words += ["--endpoint-url", args.endpoint_url]
    return " ".join(shlex.quote(word) for word in words)


# `aws cloudformation` words that deploy a template printed by --output cloudformation (TEMPLATE) over a stack.
_DEPLOY = "deploy --template-file TEMPLATE --capabilities CAPABILITY_NAMED_IAM"


def _stack_commands(stacks: tuple[str, ...], action: str, region: str) -> str:
    """`aws cloudformation ACTION` for each stack, as one line."""
    return "; ".join(
        f"aws cloudformation {action} --stack-name {shlex.quote(stack)} --region {region}" for stack in stacks
    )


def _not_in_a_stack(found: inventory.Inventory, command: str, instead: str) -> None:
    """Raise UsageError when a CloudFormation stack made what `command` would change: CloudFormation's record of the
    stack would no longer match what exists (drift), and its next update could fail on it."""
    if not found.stacks:
        return
    stacks = ", ".join(found.stacks)
    raise UsageError(
        f"the resources of cluster {found.cluster_id!r} belong to CloudFormation stack {stacks}, and natfwd "
        f"{command} would change them behind the stack's back; nothing was done. {instead}"
    )


def provision(args: argparse.Namespace, stdin: TextIO | None, stdout: TextIO, stderr: TextIO) -> int:
    """natfwd provision: plan, show, confirm, apply, report. Returns the exit code; raises NatfwdError/UsageError."""
    request = plan.ProvisionRequest(
        cluster_id=plan.parse_cluster_id(args.cluster_id),
        trusted_cidrs=plan.parse_trusted_cidrs(args.trusted_cidr),
        mode=args.mode,
        instance_type=args.instance_type,
        key_name=args.key_name,
        subnet_id=args.subnet_id,
        package=plan.parse_package(args.package) if args.package is not None else None,
        architecture=args.architecture,
        ha=args.ha,
        replicas=plan.parse_replicas(args.replicas),
    )
    if args.output == "cloudformation":
        return _template(args, request, stdout, stderr)
    client = AwsClient.create(args.region, args.profile, args.endpoint_url)
    found = inventory.find(client, request.cluster_id)
    _not_in_a_stack(
        found,
        "provision",
        "Change the stack instead: print its new template (TEMPLATE) with the same arguments and --output "
        f"cloudformation, then: {_stack_commands(found.stacks, _DEPLOY, client.region)}",
    )
    the_plan = survey.prepare(client, request)
    changes = apply.diff(the_plan, found)
    print(plantext.render(the_plan), file=stdout)
    print("changes:", file=stdout)
    print("\n".join(f"  {line}" for line in changes.lines(the_plan)), file=stdout, flush=True)
    if args.dry_run:
        print("dry run: nothing was created or changed", file=stdout)
        return 0
    if changes.empty:
        print("everything already exists; nothing to change", file=stdout, flush=True)
    elif not args.yes:
        _confirm("Make these changes?", stdin, stderr, "provision")
    command = destroy_command(args, client.region)
    timing = Timing(timeout_s=args.wait_timeout)
    outcome = apply.apply(client, the_plan, found, _progress(stderr), command, timing)
    print(report.render(outcome, command), file=stdout)
    return 0


def _template(args: argparse.Namespace, request: plan.ProvisionRequest, stdout: TextIO, stderr: TextIO) -> int:
    """provision --output cloudformation: read the account as --dry-run does, print the template, create nothing."""
    from forwarder.aws import cloudformation

    if request.package is None:
        raise UsageError(cloudformation.NEEDS_PACKAGE)
    client = AwsClient.create(args.region, args.profile, args.endpoint_url)
    text = cloudformation.render(survey.prepare(client, request))
    print(text, file=stdout, end="", flush=True)
    found = inventory.find(client, request.cluster_id)
    if found.stacks:
        # An update of the stack that made them: the template is for `aws cloudformation deploy` of that stack.
        print(
            f"natfwd: nothing was created; CloudFormation stack {', '.join(found.stacks)} holds the resources of "
            f"{request.cluster_id!r}: update it with: {_stack_commands(found.stacks, _DEPLOY, client.region)}",
            file=stderr,
        )
        return 0
    if not found.empty:
        # The stack would fail on the names these hold (security group, role, launch template).
        print(
            f"natfwd: warning: provision already made resources for {request.cluster_id!r} "
            f"({'; '.join(found.lines())}); remove them with {destroy_command(args, client.region)} "
            "before deploying the template",
            file=stderr,
        )
    stack = shlex.quote(f"natfwd-{request.cluster_id}")
    print(
        f"natfwd: nothing was created; deploy the template with: aws cloudformation deploy --stack-name {stack} "
        f"--template-file TEMPLATE --capabilities CAPABILITY_NAMED_IAM --region {client.region}; "
        f"remove it with: aws cloudformation delete-stack --stack-name {stack} --region {client.region}",
        file=stderr,
    )
    return 0


def destroy_resources(args: argparse.Namespace, stdin: TextIO | None, stdout: TextIO, stderr: TextIO) -> int:
    """natfwd destroy: find by tags, show, confirm, remove. Returns the exit code; raises NatfwdError/UsageError."""
    cluster_id = plan.parse_cluster_id(args.cluster_id)
    client = AwsClient.create(args.region, args.profile, args.endpoint_url)
    found = inventory.find(client, cluster_id)
    _not_in_a_stack(
        found, "destroy", f"Remove the stack with: {_stack_commands(found.stacks, 'delete-stack', client.region)}"
    )
    if found.empty:
        print(
            f"nothing to destroy: no resources tagged {plan.TAG_CLUSTER}={cluster_id} in {client.region}", file=stdout
        )
        return 0
    print(destroy.render(found, client.region), file=stdout, flush=True)
    if not args.yes:
        _confirm("Destroy these resources?", stdin, stderr, "destroy")
    removed = destroy.destroy(client, found, _progress(stderr))
    print(f"destroyed {len(removed)} resources for cluster {cluster_id!r}", file=stdout)
    return 0
