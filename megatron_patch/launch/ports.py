"""A free TCP port on the loopback interface, for single-node ``torch.distributed`` rendezvous."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the OS reported free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
