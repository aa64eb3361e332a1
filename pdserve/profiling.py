"""On-demand torch.profiler traces of a worker's engine, like vLLM's start_profile /
stop_profile: an operator (or a benchmark) starts a trace on a live worker, sends some
requests, stops it and opens the Chrome trace (chrome://tracing, Perfetto).

The profiler starts and stops on the engine thread (the worker runs both calls through
AsyncEngine.call), so the trace holds every op the engine launches, with the engine's
own ranges (`pdserve.schedule`, `pdserve.launch`, `pdserve.resolve`, `pdserve.update`)
around them. Traces are written on the worker's node, under the directory the caller
names: nothing travels back but the path.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class EngineProfiler:
    def __init__(self, name: str) -> None:
        self.name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "engine"
        self._prof: torch.profiler.profile | None = None
        self._dir: Path | None = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self, out_dir: str, with_stack: bool = False) -> None:
        if self._prof is not None:
            raise RuntimeError("a profile is already running; stop it first")
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"profile directory {path} is not writable")
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=acts, record_shapes=False, with_stack=with_stack)
        prof.start()
        self._prof, self._dir = prof, path

    def stop(self) -> str:
        """Stop and write the trace; returns its path."""
        prof, path = self._prof, self._dir
        if prof is None or path is None:
            raise RuntimeError("no profile is running")
        self._prof = self._dir = None
        prof.stop()
        out = path / f"{self.name}-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}.pt.trace.json"
        prof.export_chrome_trace(str(out))
        logger.info("profile of %s written to %s", self.name, out)
        return str(out)


class ProfiledWorker:
    """The workers' profiling calls (Ray actor methods), for a class with an AsyncEngine
    in `self.aengine` and its WorkerSpec in `self.spec`."""
    aengine: Any
    spec: Any

    async def start_profile(self, out_dir: str) -> None:
        """Start a torch.profiler trace of this worker's engine; the trace is written
        under out_dir on this worker's node."""
        assert self.aengine is not None
        await self.aengine.start_profile(out_dir, self.spec.worker_id)

    async def stop_profile(self) -> str:
        """Stop the trace and write it; returns its path."""
        assert self.aengine is not None
        return await self.aengine.stop_profile()
