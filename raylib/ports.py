"""The one free-port helper (Serve's HAProxy admin ports, tests, benches)."""

import socket


def free_port() -> int:
    """A TCP port free on every interface now (HAProxy binds its admin listeners to all of them)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
