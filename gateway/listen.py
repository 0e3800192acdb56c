"""Whether the gateway could listen on its address: checked before anything is started."""

from __future__ import annotations

import socket


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on (or holds) ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server binds (SO_REUSEADDR): a port in TIME_WAIT is free, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
