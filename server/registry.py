"""The models a server serves, by name: each loads on its first request into its own `Engine`;
beyond `max_loaded`, the least recently used one is unloaded (its engine closed). All models
share one `ComputeThread`, so their kernels never run from two threads at once."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from llmx.engine.compute import ComputeThread
from llmx.engine.engine import Engine
from llmx.engine.model import Model
from llmx.engine.speculative import check_same_vocabulary
from llmx.errors import LlmxError, UsageError


@dataclass(frozen=True)
class EngineSettings:
    threads: int | None = None
    ctx: int = 4096
    parallel: int = 16
    max_batched_tokens: int = 512
    kv_cache_tokens: int = 32768
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    isa: str | None = None  # "avx2", "vnni", "portable"; None: the CPU's best
    lookup: int = 0  # prompt-lookup proposals per step (0: none)
    draft: Path | None = None  # a draft model for speculative decoding
    draft_max: int = 7
    device: str = "cpu"  # "cpu" or "cuda" (resolved by the CLI)


class UnknownModel(LlmxError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"model {name!r} is not served here; models: {', '.join(known)}")


class ModelRegistry:
    def __init__(self, paths: dict[str, Path], default: str, settings: EngineSettings, max_loaded: int = 0):
        self.paths = paths
        self.default = default
        self.settings = settings
        self.max_loaded = max_loaded  # 0: no limit
        self.created = int(time.time())
        self._loaded: OrderedDict[str, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._compute = ComputeThread()

    def resolve(self, name: str | None) -> str:
        """The served name a request means: its `model`, else the default; unknown ones are an error."""
        name = name or self.default
        if name not in self.paths:
            raise UnknownModel(name, sorted(self.paths))
        return name

    def engine(self, name: str) -> Engine:
        """The engine of served model `name`, loading it (and unloading the least recent) if needed."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            engine = self._start(name)
            self._loaded[name] = engine
            while self.max_loaded and len(self._loaded) > self.max_loaded:
                _, old = self._loaded.popitem(last=False)
                old.close()
            return engine

    def loaded(self) -> dict[str, Engine]:
        with self._lock:
            return dict(self._loaded)

    def close(self) -> None:
        with self._lock:
            for engine in self._loaded.values():
                engine.close()
            self._loaded.clear()

    def _start(self, name: str) -> Engine:
        s = self.settings
        model = Model(self.paths[name], threads=s.threads, ctx=s.ctx, compute=self._compute, isa=s.isa,
                      device=s.device)
        model.warm_up(parallel=True)  # a cold cache compiles on two processes (`engine.precompile`)
        return Engine(model, max_seqs=s.parallel, max_batched_tokens=s.max_batched_tokens,
                      kv_cache_tokens=s.kv_cache_tokens, cache_type_k=s.cache_type_k, cache_type_v=s.cache_type_v,
                      speculative=self._speculative(model))

    def _speculative(self, model: Model) -> dict | None:
        s = self.settings
        if s.draft is not None:
            draft = Model(s.draft, threads=s.threads, ctx=s.ctx, compute=self._compute, isa=s.isa, device=s.device)
            try:
                check_same_vocabulary(model, draft)
            except UsageError as e:  # another model served beside the one the draft is for
                logging.getLogger(__name__).warning("%s decodes without the draft: %s", model.path.name, e)
                return None
            draft.warm_up()
            return {"method": "draft", "model": draft, "k": s.draft_max}
        return {"method": "ngram", "k": s.lookup} if s.lookup else None
