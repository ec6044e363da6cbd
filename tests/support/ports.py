"""Free ports for the tests' own servers."""

from __future__ import annotations

import random
import socket


def ephemeral_ports() -> range:
    """The ports the kernel hands to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as limits:
            low, high = map(int, limits.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_block(size: int) -> int:
    """The first of ``size`` consecutive ports that are all free now, outside
    the ephemeral range: the network opens dozens of outgoing connections
    before its last gateway binds, and one of them once took the port an
    ephemeral pick had found free a few seconds before."""
    ephemeral = ephemeral_ports()
    starts = [
        *range(10_000, max(10_000, ephemeral.start - size)),
        *range(ephemeral.stop, 65_536 - size),
    ]
    for _ in range(200):
        first = random.choice(starts)
        sockets = []
        try:
            for port in range(first, first + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    raise RuntimeError(f"no {size} consecutive free ports")
