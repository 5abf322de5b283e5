"""Two Foolscap Tubs on loopback in the test process, for adapter unit tests."""

from __future__ import annotations

import socket

from foolscap.api import Tub


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loopback:
    """A listening server Tub and a client Tub, both started.

    :ivar server: the Tub to register Referenceables on.
    :ivar client: the Tub to connect from.
    """

    def __init__(self) -> None:
        self.server = Tub()
        port = free_port()
        self.server.listenOn(f"tcp:{port}:interface=127.0.0.1")
        self.server.setLocation(f"127.0.0.1:{port}")
        self.server.startService()
        self.client = Tub()
        self.client.startService()

    async def reference(self, obj):
        """Register ``obj`` on the server Tub; fire a RemoteReference to it."""
        furl = self.server.registerReference(obj)
        return await self.client.getReference(furl)

    async def stop(self) -> None:
        """Stop both Tubs (a Tub cannot be restarted: make a new Loopback)."""
        for tub in (self.client, self.server):
            if tub.running:
                await tub.stopService()
