"""Where the rendezvous listens: rank 0's store socket, bound to MASTER_ADDR, never ``*``.

``init_process_group(init_method="tcp://addr:port")`` makes rank 0's TCPStore listen on
every interface, whatever ``addr`` says -- a single-node run with MASTER_ADDR=127.0.0.1
exposed its port to the whole network. Instead rank 0 binds a socket itself to the address
MASTER_ADDR resolves to and hands the listening descriptor to ``TCPStore``
(``master_listen_fd``): loopback for a single node, the node's own address on a cluster.

The collectives' own sockets follow: with a loopback MASTER_ADDR every rank is on this
machine, so gloo's and NCCL's bootstrap sockets are pinned to the loopback interface
(``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, unless the user set them). Multi-node
binding is described in docs/distributed.md. Standard library only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (by name or by what the name resolves to)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket on ``host``'s own address and ``port``.

    Raises ``OSError`` naming the address when it cannot be bound (the port is taken, or
    ``host`` is not an address of this machine -- a MASTER_ADDR that points elsewhere).
    """
    errors = []
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(backlog)
            return sock
        except OSError as exc:
            sock.close()
            errors.append(f"{addr[0]}:{port}: {exc.strerror or exc}")
    raise OSError(f"cannot listen on MASTER_ADDR={host} MASTER_PORT={port} ({'; '.join(errors) or 'no address'})")


def pin_loopback_transports(master_addr: str) -> None:
    """Single node (loopback MASTER_ADDR): keep gloo's/NCCL's sockets on the loopback device."""
    if not is_loopback(master_addr):
        return
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    lo = "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), None)
    if lo is None:
        return
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, lo)
