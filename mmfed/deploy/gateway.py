"""The only port a federation exposes: Flower's Fleet API, and nothing else.

Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTP port, and the
open-source Control API has no authentication. A SuperLink listening on a public
address would let anyone who reaches it register their own SuperNode key (defeating
SuperNode authentication), or submit a run whose code every hospital then executes.
So ``mmfed server`` keeps the SuperLink on loopback and puts this gateway on the public
address: same TLS certificate, and only ``POST /v1/fleet/*`` is passed through,
byte for byte (SuperNode signatures are checked by the SuperLink behind it).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfed.deploy.processes import join_host_port
from mmfed.errors import MmfedError

log = logging.getLogger("mmfed")
FLEET_PREFIX = "/v1/fleet/"
# Connection-level headers are per hop; the rest travels unchanged.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host", "server",
                        "date"})


@dataclass(frozen=True)
class GatewaySettings:
    host: str
    port: int
    upstream: str  # base URL of the SuperLink on loopback
    certfile: Path | None  # None: plain HTTP (--insecure)
    keyfile: Path | None
    cafile: Path | None  # verifies the SuperLink behind the gateway


def build_app(settings: GatewaySettings) -> Any:
    """A Starlette app that forwards Fleet calls and answers 404 to everything else."""
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    holder: dict[str, httpx.AsyncClient] = {}

    def client() -> httpx.AsyncClient:
        # created lazily inside the server's event loop, then reused (keep-alive)
        if "c" not in holder:
            verify: ssl.SSLContext | bool = False
            if settings.cafile is not None:
                verify = ssl.create_default_context(cafile=str(settings.cafile))
            holder["c"] = httpx.AsyncClient(
                base_url=settings.upstream, verify=verify,
                timeout=httpx.Timeout(600.0, connect=10.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        return holder["c"]

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path:
            return PlainTextResponse("not found: this port serves the Fleet API only\n",
                                     status_code=404)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        upstream = client().build_request("POST", path, content=await request.body(),
                                          headers=headers, params=request.query_params)
        try:
            reply = await client().send(upstream, stream=True)
        except httpx.HTTPError as exc:
            log.warning("fleet gateway: SuperLink unreachable (%s)", type(exc).__name__)
            return PlainTextResponse("SuperLink unavailable\n", status_code=502)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code,
                                 headers=out, background=BackgroundTask(reply.aclose))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if "c" in holder:
            await holder.pop("c").aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT",
                                                                     "DELETE", "PATCH"])],
                     lifespan=lifespan)


class FleetGateway:
    """Runs the gateway's uvicorn server in a thread of the ``mmfed server`` process."""

    def __init__(self, settings: GatewaySettings) -> None:
        import uvicorn

        self.settings = settings
        config = uvicorn.Config(
            build_app(settings), host=settings.host, port=settings.port, log_level="warning",
            access_log=False, lifespan="on", timeout_graceful_shutdown=3,
            ssl_certfile=str(settings.certfile) if settings.certfile else None,
            ssl_keyfile=str(settings.keyfile) if settings.keyfile else None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fleet-gateway",
                                       daemon=True)

    @property
    def address(self) -> str:
        return join_host_port(self.settings.host, self.settings.port)

    def start(self, timeout: float = 20.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise MmfedError(f"the Fleet gateway could not listen on {self.address} "
                                 "(port in use, or an address this host does not have?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(RuntimeError):
            self.thread.join(timeout=8.0)
