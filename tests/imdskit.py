"""An IMDSv2 stand-in on loopback (of this host, or of a lab namespace): a session token from PUT, and only GETs
that present it are answered, as on an instance with `HttpTokens: required`."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from forwarder import netns

REGION = "us-east-1"


@dataclass
class Imds:
    """What the stand-in answers, and every request it saw as (method, path, status)."""

    url: str
    instance_id: str = ""
    region: str = REGION
    token: str = "natfwd-test-token"
    requests: list[tuple[str, str, int]] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    imds: Imds

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: str = "") -> None:
        self.imds.requests.append((self.command, self.path, status))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._answer(200, self.imds.token)
        else:
            self._answer(400)

    def do_GET(self) -> None:
        # IMDSv2 only: no token, no answer.
        if self.headers.get("X-aws-ec2-metadata-token") != self.imds.token:
            self._answer(401)
            return
        answers = {
            "/latest/meta-data/instance-id": self.imds.instance_id,
            "/latest/meta-data/placement/region": self.imds.region,
        }
        if self.path in answers:
            self._answer(200, answers[self.path])
        else:
            self._answer(404)


@contextlib.contextmanager
def running(server: http.server.HTTPServer) -> Iterator[None]:
    """`server` answering from a thread until the block ends; then stopped and closed."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def serving_imds(namespace: str | None = None) -> Iterator[Imds]:
    """The stand-in on 127.0.0.1 of this host, or of network namespace `namespace`; stopped on exit."""
    with netns.entered(namespace) if namespace else contextlib.nullcontext():  # the socket is born there
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    state = Imds(f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = type("Handler", (_Handler,), {"imds": state})
    with running(server):
        yield state
