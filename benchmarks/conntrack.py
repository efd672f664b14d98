"""Empty a network namespace's conntrack table (ctnetlink, as `conntrack -F` does, without the conntrack tool).

The kernel paths' flows stay in the NAT namespace's conntrack table after their rules are gone: tens of thousands in
TIME_WAIT for two minutes after a new-connection-per-request load. The next kernel path measured then finds most of
its clients' reply tuples taken, so its masquerade picks another source port, anywhere in 1024-65535: the proxies'
ports too. A flow that lands on the 4-tuple of a proxy's idle connection to the node (multiplex's shared one) makes
the node send a challenge ACK, the client answers with a RST the node accepts, and that connection is gone.
The harness empties the table after each kernel measurement.
"""

from __future__ import annotations

import socket
import struct

from forwarder import netns
from forwarder.errors import NatfwdError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2


def flush_message(family: int = socket.AF_INET, seq: int = 1) -> bytes:
    """A ctnetlink delete with no tuple: the kernel deletes every entry of `family`."""
    body = struct.pack("=BBH", family, 0, 0)  # struct nfgenmsg: family, version 0, res_id
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def flush(family: int = socket.AF_INET) -> None:
    """Delete this namespace's conntrack entries of `family`; raises OSError with the kernel's errno."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.send(flush_message(family))
        reply = sock.recv(4096)
    _length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", reply)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, 16)
        if error:
            raise OSError(-error, f"conntrack flush: {socket.AddressFamily(family).name}")


def flush_namespace(namespace: str) -> None:
    """Empty `namespace`'s IPv4 conntrack table; raises NatfwdError if that fails."""
    with netns.entered(namespace):
        try:
            flush()
        except OSError as exc:
            raise NatfwdError(f"emptying {namespace}'s conntrack table failed: {exc}") from None
