"""A kotel process's own endpoints: Prometheus ``/metrics``, ``/healthz`` (alive), ``/readyz`` (serving)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class AdminServer:
    def __init__(
        self, endpoint: str, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]],
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        host, _, port = endpoint.rpartition(":")
        self.host, self.port = host, int(port)
        self._registry = registry
        self._before_scrape = before_scrape  # refreshes gauges sampled at scrape time
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        if self._before_scrape is not None:
            self._before_scrape()
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, detail = self._ready()
        return web.Response(status=200 if ready else 503, text=detail + "\n")
