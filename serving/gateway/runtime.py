"""What the server serves now, swapped whole on a config reload, and its draining state.

A reload (SIGHUP) builds the next `Gateway` beside the current one: experts whose settings did
not change keep their loaded engine, new or changed ones load, router artifacts are read afresh.
Only when all of it loaded does the swap happen; requests already running finish on the gateway
they started on, whose engines that the new one did not take over are closed once they are done.
A config that does not validate, or whose new experts fail to load, is refused: the old one
keeps serving. The `server` section (listen address, keys, limits) and `tracing` apply from the
next restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

from ensemble.engine import Engine
from serving.config import Config, ConfigError, load_config
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.pools import Gateway
from serving.gateway.service import ChatService

logger = logging.getLogger(__name__)


class Runtime:
    def __init__(
        self,
        config: Config,
        metrics: GatewayMetrics,
        engines: Mapping[str, Engine] | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.metrics = metrics
        self.config_path = config_path
        self.gateway = Gateway(config, metrics, engines)
        self.service = ChatService(self.gateway)
        self.draining = False  # shutting down: refuse new requests, finish those running
        self._reloading = asyncio.Lock()
        self._retiring: dict[asyncio.Task[None], Gateway] = {}  # old gateways still finishing

    async def reload(self) -> bool:
        """Load the config file again and swap to it; False (and the old one kept) if refused."""
        if self.config_path is None:
            return False
        async with self._reloading:  # one reload at a time; requests are never blocked by it
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                return self._refuse(f"invalid config\n{exc}")
            old = self.gateway
            if config.server != old.config.server:
                logger.warning("reload: `server` settings changed; they apply at the next restart")
            if config.tracing != old.config.tracing:
                logger.warning("reload: `tracing` settings changed; they apply at the next restart")
            new = Gateway(config, self.metrics, previous=old)
            await new.start()
            if new.load_errors or not new.ready:
                await new.aclose(keep=old)
                return self._refuse(f"it failed to load: {new.load_errors or 'nothing can serve'}")
            self.gateway, self.service = new, ChatService(new)
            self.metrics.config_reloads.labels("ok").inc()
            kept = sorted(new.reused)
            logger.info("reloaded %s (experts kept loaded: %s)", self.config_path, kept or "none")
            older = list(self._retiring)
            task = asyncio.create_task(self._retire(old, new, older))
            self._retiring[task] = old
            task.add_done_callback(self._retiring.pop)
            return True

    def _refuse(self, reason: str) -> bool:
        logger.error(
            "reload of %s refused, the old config keeps serving: %s", self.config_path, reason
        )
        self.metrics.config_reloads.labels("refused").inc()
        return False

    async def _retire(self, old: Gateway, new: Gateway, older: list[asyncio.Task[None]]) -> None:
        # Gateways retire in order: one that is older may still run requests on engines that
        # `old` shares with it.
        await asyncio.gather(*older, return_exceptions=True)
        while old.inflight:
            await asyncio.sleep(0.1)
        await old.aclose(keep=new)

    async def aclose(self) -> None:
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.aclose(keep=self.gateway)
        await self.gateway.aclose()
