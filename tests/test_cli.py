"""The command line as a person types it: global options anywhere, the default config path, help, completion."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, wait_port, write_config

from forwarder import cli, config

NATFWD = [sys.executable, "-m", "forwarder"]
COMMANDS = ("serve", "emit-iptables", "check", "lab", "provision", "destroy", "claim-address", "completion")


def natfwd(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NATFWD, *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd, stdin=subprocess.DEVNULL
    )


def environment(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != cli.CONFIG_ENV}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write_config(tmp_path / "natfwd.yaml", [(free_port(), "127.0.0.1:11211")])


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_before_or_after_the_command(tmp_path: Path, where: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: memcached\nbogus: 1\n")
    args = ["check", "--config", str(bad)]
    proc = natfwd(*(["--debug", *args] if where == "before" else [*args, "--debug"]), env=environment())
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr  # --debug took effect
    without = natfwd(*args, env=environment())
    assert without.returncode == 2 and "Traceback" not in without.stderr


def test_log_format_after_the_command(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path / "natfwd.yaml", [(port, f"127.0.0.1:{free_port()}")])
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [*NATFWD, "serve", "--config", str(path), "--log-format", "json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=environment(PYTHONUNBUFFERED="1"),
        )
        try:
            wait_port("127.0.0.1", port, 15, process=proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    lines = log_path.read_text().splitlines()
    assert lines
    entries = [json.loads(line) for line in lines]  # every line is JSON
    assert any(entry["msg"] == "forwarding" for entry in entries)


def test_a_global_option_given_twice_keeps_the_later_one(cfg: Path) -> None:
    args = cli.build_parser().parse_args(["--log-format", "json", "emit-iptables", "--config", str(cfg)])
    assert args.log_format == "json" and args.debug is False  # the command's parser does not reset them
    args = cli.build_parser().parse_args(["--log-format", "json", "emit-iptables", "--log-format", "text"])
    assert args.log_format == "text"


def test_config_from_natfwd_config_then_the_option(cfg: Path, tmp_path: Path) -> None:
    by_option = natfwd("emit-iptables", "--config", str(cfg), env=environment())
    assert by_option.returncode == 0, by_option.stderr
    by_env = natfwd("emit-iptables", env=environment(NATFWD_CONFIG=str(cfg)))
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout == by_option.stdout
    # --config wins over the environment.
    missing = tmp_path / "missing.yaml"
    proc = natfwd("emit-iptables", "--config", str(missing), env=environment(NATFWD_CONFIG=str(cfg)))
    assert proc.returncode == 2
    assert f"config: '{missing}' does not exist" in proc.stderr


def test_default_config_path(tmp_path: Path) -> None:
    if Path(config.DEFAULT_PATH).exists():
        pytest.skip(f"{config.DEFAULT_PATH} exists on this host")
    proc = natfwd("check", env=environment())
    assert proc.returncode == 2
    assert proc.stderr == (
        f"natfwd: error: config: '{config.DEFAULT_PATH}' does not exist; pass --config, set NATFWD_CONFIG, "
        f"or create {config.DEFAULT_PATH}\n"
    )


def test_serve_warns_about_a_wide_allowlist_and_public_metrics(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(
        tmp_path / "natfwd.yaml",
        [(port, f"127.0.0.1:{free_port()}")],
        allowed="0.0.0.0/0",
        extra=f"metrics: {{listen: '0.0.0.0:{free_port()}'}}\n",
    )
    proc = subprocess.Popen(
        [*NATFWD, "serve", "--config", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(PYTHONUNBUFFERED="1"),
    )
    try:
        wait_port("127.0.0.1", port, 15, process=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    warnings = [line for line in stderr.splitlines() if " warning " in line]
    assert any("allowed_clients[0]: 0.0.0.0/0 is wider than /8" in line for line in warnings), stderr
    assert any("metrics.listen: 0.0.0.0:" in line and "not a loopback address" in line for line in warnings), stderr


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_has_examples_and_no_empty_defaults(command: str | None) -> None:
    proc = natfwd(*([command] if command else []), "--help", env=environment())
    assert proc.returncode == 0
    text = proc.stdout
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    assert "examples:" in text
    assert re.search(r"\n  (sudo )?natfwd ", text.split("examples:")[1])  # the examples are command lines
    flat = " ".join(text.split())
    if command in ("provision", "destroy"):
        region = flat[flat.index("--region REGION AWS region") :].split("--profile")[0]
        assert region.count("default") == 1, region
    if command == "emit-iptables":
        assert "(default: commands)" in flat
    if command == "serve":
        assert "(default: $NATFWD_CONFIG, else /etc/natfwd/natfwd.yaml)" in flat


@pytest.mark.parametrize("shell", cli.SHELLS)
def test_completion_scripts(shell: str) -> None:
    proc = natfwd("completion", shell, env=environment())
    assert proc.returncode == 0, proc.stderr
    assert "natfwd" in proc.stdout and "_ARGCOMPLETE" in proc.stdout
    binary = shutil.which(shell)
    if binary is not None:  # the script at least parses in the shell it is for
        check = subprocess.run([binary, "-n"], input=proc.stdout, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr


def complete(line: str, tmp_path: Path) -> list[str]:
    """What the completion scripts ask natfwd for a command line: argcomplete's protocol, answers on fd 8."""
    out = tmp_path / "answers"
    with open(out, "w+b") as answers:
        env = environment(
            _ARGCOMPLETE="1",
            _ARGCOMPLETE_IFS="\n",
            _ARGCOMPLETE_SUPPRESS_SPACE="1",
            COMP_LINE=line,
            COMP_POINT=str(len(line)),
            COMP_TYPE="9",
        )
        proc = subprocess.run(
            [*NATFWD],
            env=env,
            close_fds=False,  # fd 8, made by dup2 in the child, must stay open through exec
            preexec_fn=lambda: os.dup2(answers.fileno(), 8),
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
    return sorted(word.strip() for word in out.read_text().split("\n") if word.strip())


def test_completion_answers(tmp_path: Path) -> None:
    assert complete("natfwd ", tmp_path) == sorted([*COMMANDS, "-h", "--help", "--version", "--debug", "--log-format"])
    assert complete("natfwd se", tmp_path) == ["serve"]
    assert complete("natfwd emit-iptables --format ", tmp_path) == ["commands", "nft", "restore"]
    assert complete("natfwd lab --engine r", tmp_path) == ["redis"]
    assert [word for word in complete("natfwd completion ", tmp_path) if not word.startswith("-")] == sorted(cli.SHELLS)


def test_completion_in_a_real_bash(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "natfwd"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m forwarder "$@"\n')
    wrapper.chmod(0o755)
    script = natfwd("completion", "bash", env=environment()).stdout
    (tmp_path / "complete.bash").write_text(script)
    probe = (
        f"source {tmp_path / 'complete.bash'}\n"
        'COMP_LINE="natfwd check --di"; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(natfwd check --di); COMP_CWORD=2\n'
        "_python_argcomplete natfwd\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = environment(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([bash, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["--direct"]
