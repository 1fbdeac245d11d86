"""Async client for a SandboxFusion-compatible ``/run_code`` server (ours or the original).

Connection errors, timeouts, 429 and 5xx are retried with exponential backoff; other 4xx are not
(the request itself is wrong). A call that still fails returns a ``SandboxError`` response, which the
agent shows the model as a failed tool call: a dead sandbox never hangs or crashes a rollout batch.
A global semaphore bounds the calls in flight.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import aiohttp

from sod_jax.sandbox.protocol import sandbox_error


class FusionSandbox:
    def __init__(self, url: str = "http://127.0.0.1:8080", *, max_concurrency: int = 64, retries: int = 3,
                 backoff: float = 0.5, request_timeout: Optional[float] = None):
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.request_timeout = retries, backoff, request_timeout
        self.max_concurrency = max_concurrency
        self._sem: Optional[asyncio.Semaphore] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self.attempts = 0  # HTTP attempts made (diagnostics)

    def _ensure(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._sem = asyncio.Semaphore(self.max_concurrency)

    async def run(self, request: dict) -> dict:
        self._ensure()
        # the server may take run_timeout to answer; give it room before calling the attempt failed
        total = self.request_timeout or float(request.get("run_timeout") or 10.0) + 30.0
        last = "no attempt made"
        async with self._sem:
            for attempt in range(self.retries + 1):
                self.attempts += 1
                try:
                    async with self._session.post(f"{self.url}/run_code", json=request,
                                                  timeout=aiohttp.ClientTimeout(total=total)) as resp:
                        if resp.status == 200:
                            return await resp.json()
                        text = (await resp.text())[:300]
                        if resp.status != 429 and resp.status < 500:
                            return sandbox_error(f"sandbox server rejected the request: HTTP {resp.status}: {text}")
                        last = f"HTTP {resp.status}: {text}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    last = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    await asyncio.sleep(self.backoff * 2**attempt)
        return sandbox_error(f"sandbox server {self.url} failed {self.retries + 1} times; last error: {last}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
