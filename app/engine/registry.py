"""The engines a worker serves, found by model name or alias."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from config import ModelConfig, Settings

from .errors import ModelUnavailable, UnknownModel
from .engine import Engine
from .loader import ModelLoadError, load_engine

log = logging.getLogger(__name__)


class EngineRegistry:
    """Maps every configured name and alias to its engine; loads them on demand or all at once."""

    def __init__(
        self,
        settings: Settings,
        engines: Iterable[Engine] = (),
        loader: Callable[[ModelConfig, Settings, int], Engine] = load_engine,
    ):
        self.settings = settings
        self.loader = loader
        self.configs = {name: model for model in settings.models for name in model.names}
        self._engines = {engine.name: engine for engine in engines}
        for engine in self._engines.values():
            self.configs.update({name: engine.config for name in engine.config.names})
        self._lock = threading.Lock()
        self.slot = 0
        self.stopping = threading.Event()  # set when the worker stops: running requests end with an error

    @property
    def models(self) -> list[ModelConfig]:
        """The served models' configs, each once, in config order."""
        return list({id(m): m for m in self.configs.values()}.values())

    @property
    def default_name(self) -> str:
        """The model used when a request names none."""
        return self.models[0].name

    def loaded(self) -> list[Engine]:
        """The engines this worker has loaded."""
        return list(self._engines.values())

    def not_loaded(self) -> list[str]:
        """Names of the served models this worker has not loaded (yet)."""
        # No lock: get() holds it for a whole load, and a readiness probe must not wait for that.
        return [m.name for m in self.models if m.name not in self._engines]

    def load_all(self, slot: int = 0) -> None:
        """Load every configured model now (a worker does this in post_fork, before serving)."""
        self.slot = slot
        for model in self.models:
            self.get(model.name).warmup()

    def get(self, name: str | None) -> Engine:
        """The engine for a model name or alias (the default model for None)."""
        config = self.configs.get(name or self.default_name)
        if config is None:
            served = ", ".join(n for m in self.models for n in m.names)
            raise UnknownModel(f"The model {name!r} does not exist. This server serves: {served}", param="model")
        with self._lock:
            engine = self._engines.get(config.name)
            if engine is None:
                try:
                    engine = self.loader(config, self.settings, self.slot)
                except ModelLoadError as exc:
                    log.error("%s", exc)
                    raise ModelUnavailable(f"model {config.name!r} could not be loaded; see the server log") from exc
                self._engines[config.name] = engine
        return engine
