"""Scoring batches off the hot path.

:class:`RewardPool` scores a batch of ``{data_source, solution, ground_truth, extra_info}`` items:

* ``math`` / ``choice`` items with ``reward.math_verify`` (or a custom worker function) run in worker
  processes, one item at a time each; a worker that exceeds ``reward.timeout`` on an item is killed
  and replaced, a worker that dies is replaced, and the item scores as wrong (counted in ``stats``).
  The strict string rule cannot hang and runs in the calling thread.
* ``code`` items run their tests through the sandbox from an event loop on a background thread,
  each item bounded by ``reward.timeout``.

``score(items)`` blocks; ``submit(items)`` returns a ``concurrent.futures.Future`` so scoring overlaps
other work. Every result is ``{"score", "acc", "pred", "error"}`` with ``error`` None, ``"timeout"``
or what went wrong; a failure never raises out of the pool.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing as mp
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import wait
from typing import Any, Optional, Sequence

from sod_jax.rewards.code import score_code
from sod_jax.rewards.math import score_math_verify, score_strict
from sod_jax.rewards.registry import check_sources, source_map
from sod_jax.sandbox.fusion import FusionSandbox
from sod_jax.sandbox.local import LocalSandbox

DEFAULT_WORKER_FN = "sod_jax.rewards.pool:score_text"


def score_text(scorer: str, solution: str, ground_truth: Any, math_verify: bool) -> dict:
    """One math/choice item (choice never uses math-verify: option letters compare as strings)."""
    if math_verify and scorer == "math":
        return score_math_verify(solution, str(ground_truth))
    return score_strict(solution, str(ground_truth))


def wrong(error: str, pred: str = "") -> dict:
    return {"score": -1.0, "acc": False, "pred": pred, "error": error}


def _worker_main(conn, fn_path: str) -> None:
    mod, name = fn_path.split(":")
    fn = getattr(importlib.import_module(mod), name)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            out = dict(fn(*job))
            out.setdefault("error", None)
        except Exception as e:  # a crashing check scores as wrong
            out = wrong(f"{type(e).__name__}: {e}")
        conn.send(out)


class _Worker:
    def __init__(self, ctx, fn_path: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, fn_path), daemon=True)
        self.proc.start()
        child.close()
        self.job: Optional[int] = None
        self.started = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class _ProcessScorer:
    """Worker processes with a hard per-item timeout (kill and replace)."""

    def __init__(self, workers: int, timeout: float, fn_path: str):
        self.n, self.timeout, self.fn_path = max(1, workers), timeout, fn_path
        self.ctx = mp.get_context("spawn")  # never fork a process that may hold JAX threads
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()

    def run(self, jobs: list[tuple], stats: Counter) -> list[dict]:
        with self.lock:
            while len(self.workers) < min(self.n, len(jobs)):
                self.workers.append(_Worker(self.ctx, self.fn_path))
            results: list[Optional[dict]] = [None] * len(jobs)
            todo = list(range(len(jobs)))[::-1]
            busy: dict[Any, _Worker] = {}
            while todo or busy:
                for w in self.workers:
                    if w.job is None and todo:
                        w.job, w.started = todo.pop(), time.monotonic()
                        w.conn.send(jobs[w.job])
                        busy[w.conn] = w
                now = time.monotonic()
                left = min((w.started + self.timeout - now for w in busy.values()), default=self.timeout)
                for conn in wait(list(busy), timeout=max(0.0, left)):
                    w = busy.pop(conn)
                    try:
                        results[w.job] = conn.recv()
                    except (EOFError, OSError):
                        results[w.job] = wrong("the scoring worker died")
                        stats["errors"] += 1
                        self._replace(w)
                    w.job = None
                now = time.monotonic()
                for conn, w in list(busy.items()):
                    if now - w.started >= self.timeout:
                        results[w.job] = wrong("timeout")
                        stats["timeouts"] += 1
                        busy.pop(conn)
                        self._replace(w)
            for r in results:
                if r and r.get("error") not in (None, "timeout", "the scoring worker died"):
                    stats["errors"] += 1
            return results

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers[self.workers.index(w)] = _Worker(self.ctx, self.fn_path)

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.proc.join(2)
            if w.proc.is_alive():
                w.kill()
        self.workers = []


def _loop_local_copy(sandbox: Any) -> Any:
    """A copy of a known sandbox for the pool's own event loop. The local executor and the fusion
    client hold asyncio objects bound to the loop that first used them (the agent's), so the pool runs
    code tests on a copy with the same settings; unknown sandbox types are used as given."""

    if isinstance(sandbox, LocalSandbox):
        return LocalSandbox(sandbox.cfg)
    if isinstance(sandbox, FusionSandbox):
        return FusionSandbox(sandbox.url, max_concurrency=sandbox.max_concurrency, retries=sandbox.retries,
                             backoff=sandbox.backoff, request_timeout=sandbox.request_timeout)
    return sandbox


class RewardPool:
    """Batch scorer (see the module docstring). ``reward_cfg`` is the ``reward`` config section;
    ``sandbox`` runs code tests (default: a :class:`~sod_jax.sandbox.LocalSandbox` owned by the pool);
    a given local or fusion sandbox is copied (same settings) for the pool's own event loop thread."""

    def __init__(self, reward_cfg: Any = None, sandbox: Any = None, *, sandbox_cfg: Any = None,
                 worker_fn: str = DEFAULT_WORKER_FN):
        if reward_cfg is None:
            from sod_jax.config import RewardConfig

            reward_cfg = RewardConfig()
        self.cfg = reward_cfg
        self.sources = source_map(getattr(reward_cfg, "sources", None))
        self.timeout = float(getattr(reward_cfg, "timeout", 30.0))
        self.case_timeout = float(getattr(reward_cfg, "case_timeout", 6.0))
        self.math_verify = bool(getattr(reward_cfg, "math_verify", False))
        self.worker_fn = worker_fn
        self._procs = _ProcessScorer(getattr(reward_cfg, "workers", 8), self.timeout, worker_fn)
        self._sandbox, self._sandbox_cfg, self._owns_sandbox = sandbox, sandbox_cfg, sandbox is None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._dispatch = ThreadPoolExecutor(1, thread_name_prefix="reward-pool")
        self.stats: Counter = Counter()

    # -- public -----------------------------------------------------------------------------------

    def score(self, items: Sequence[dict]) -> list[dict]:
        """Scores of ``items`` in order (blocking). Unknown sources raise (call :func:`check_sources`
        at start-up to fail early)."""
        check_sources([it["data_source"] for it in items], self.cfg)
        results: list[Optional[dict]] = [None] * len(items)
        code_idx = [i for i, it in enumerate(items) if self.sources[it["data_source"]] == "code"]
        text_idx = [i for i, it in enumerate(items) if self.sources[it["data_source"]] != "code"]
        code_future = None
        if code_idx:
            code_future = asyncio.run_coroutine_threadsafe(self._code_batch([items[i] for i in code_idx]),
                                                           self._ensure_loop())
        if text_idx:
            jobs = [(self.sources[items[i]["data_source"]], items[i]["solution"], items[i]["ground_truth"],
                     self.math_verify) for i in text_idx]
            if self.math_verify or self.worker_fn != DEFAULT_WORKER_FN:
                outs = self._procs.run(jobs, self.stats)
            else:  # the strict rule is a string search: no process needed
                outs = [{**score_text(*j), "error": None} for j in jobs]
            for i, out in zip(text_idx, outs):
                results[i] = out
        if code_future is not None:
            for i, out in zip(code_idx, code_future.result()):
                results[i] = out
        self.stats["items"] += len(items)
        return results  # type: ignore[return-value]

    def submit(self, items: Sequence[dict]) -> Future:
        """Score in the background; ``.result()`` gives :meth:`score`'s list."""
        return self._dispatch.submit(self.score, list(items))

    def close(self) -> None:
        self._dispatch.shutdown(wait=True)
        self._procs.close()
        if self._loop is not None:
            if self._owns_sandbox and self._sandbox is not None:
                asyncio.run_coroutine_threadsafe(self._sandbox.close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- code -------------------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="reward-code", daemon=True)
            self._thread.start()
        return self._loop

    def _get_sandbox(self):
        if self._sandbox is not None and not self._owns_sandbox and not getattr(self, "_cloned", False):
            self._sandbox = _loop_local_copy(self._sandbox)
            self._cloned, self._owns_sandbox = True, True
        if self._sandbox is None:
            from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig

            cfg = self._sandbox_cfg or LocalSandboxConfig(workers=max(1, int(getattr(self.cfg, "workers", 8))))
            self._sandbox = LocalSandbox(cfg)
        return self._sandbox

    async def _code_batch(self, items: list[dict]) -> list[dict]:
        try:
            sandbox = self._get_sandbox()
        except Exception as e:  # no isolation available: every code item is wrong, and says why
            self.stats["errors"] += len(items)
            return [wrong(f"sandbox unavailable: {e}") for _ in items]
        sem = asyncio.Semaphore(max(1, int(getattr(getattr(sandbox, "cfg", None), "workers", 8))))

        async def one(it: dict) -> dict:
            async with sem:
                try:
                    out = await asyncio.wait_for(
                        score_code(it["solution"], it["ground_truth"], sandbox, case_timeout=self.case_timeout),
                        timeout=self.timeout)
                    return {**out, "error": None}
                except asyncio.TimeoutError:
                    self.stats["timeouts"] += 1
                    return {**wrong("timeout"), "score": 0.0}
                except Exception as e:
                    self.stats["errors"] += 1
                    return {**wrong(f"{type(e).__name__}: {e}"), "score": 0.0}

        return list(await asyncio.gather(*(one(it) for it in items)))
