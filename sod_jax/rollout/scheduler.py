"""Continuous batching over the slot engine: the one scheduler behind :func:`generate` (whole
requests to completions) and the agent loop's :class:`~sod_jax.rollout.agent.EnginePolicy`.

It owns the free-slot list and turns the engine's device outputs into per-slot token events:

* :meth:`SlotScheduler.start` prefills a batch of prompts (one device call per prompt-length
  bucket) and inserts each into its ``n`` slots.
* :meth:`SlotScheduler.extend` appends tool responses to every slot whose tool results arrived,
  one device call per tool-text bucket, without a host sync (the scheduler knows each slot's exact
  cache length from the tokens it has harvested).
* :meth:`SlotScheduler.dispatch` queues the next decode call *before* the previous outputs are read
  back, so host work overlaps the device; :meth:`SlotScheduler.harvest` reads everything dispatched
  earlier, in dispatch order.

Every dispatched output is tagged with each slot's *turn* counter (bumped by every start, extend and
release), so an output never feeds a slot's next turn or next occupant.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import jax
import numpy as np

from sod_jax.rollout.engine import Completion, Engine, EngineError, Request
from sod_jax.rollout.sampling import SamplingParams


@dataclass
class StartItem:
    """One prompt going into ``slots`` (its ``len(slots)`` samples share one prefill)."""

    prompt_ids: Sequence[int]
    slots: Sequence[int]
    sampling: SamplingParams
    seed: int
    budget: int  # tokens each sample may generate


class Dispatched(NamedTuple):
    """One device call whose outputs are not read yet."""

    kind: str  # "first": (token, logprob, active) per listed slot; "step": a decode call over all slots
    slots: list  # slots of a "first" entry ([] for "step")
    turns: np.ndarray  # the turn counter of every slot at dispatch
    out: Any  # device arrays


class SlotScheduler:
    """Free slots, per-slot turns and the queue of dispatched device calls of one :class:`Engine`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        S = engine.num_slots
        self.free: deque[int] = deque(range(S))
        self.turn = np.zeros(S, np.int64)
        self.length = np.zeros(S, np.int64)  # prompt + harvested + appended tokens (incl. the pending one)
        self.active: set[int] = set()  # slots whose current turn has not been reported as ended
        self.queue: list[Dispatched] = []

    @property
    def num_free(self) -> int:
        return len(self.free)

    def acquire(self, n: int) -> list[int]:
        """``n`` free slots; with the cache split over devices, each from the device with the fewest
        slots in use (so every device decodes its share)."""
        if n > len(self.free):
            raise EngineError(f"{n} slots asked but {len(self.free)} of {self.engine.num_slots} are free")
        D = getattr(self.engine, "slot_devices", 1)
        if D <= 1:
            return [self.free.popleft() for _ in range(n)]
        per = self.engine.num_slots // D
        free_on = [[s for s in self.free if s // per == d] for d in range(D)]
        busy = [per - len(f) for f in free_on]
        out = []
        for _ in range(n):
            d = min((d for d in range(D) if free_on[d]), key=lambda d: busy[d])
            out.append(free_on[d].pop(0))
            busy[d] += 1
        taken = set(out)
        self.free = deque(s for s in self.free if s not in taken)
        return out

    def release(self, slot: int) -> None:
        self.turn[slot] += 1
        self.active.discard(slot)
        self.engine.release(slot)
        self.free.append(slot)

    def busy(self) -> bool:
        """Whether anything is generating or waiting to be read back."""
        return bool(self.active) or bool(self.queue)

    def _first(self, slots: list[int], out: Any) -> None:
        for s in slots:
            self.turn[s] += 1
        self.active.update(slots)
        self.queue.append(Dispatched("first", slots, self.turn.copy(), out))

    def start(self, items: Sequence[StartItem]) -> None:
        """Prefill + insert every item: one prefill per prompt-length bucket, all its prompts' slots
        filled by one insert. Prompts must fit (:meth:`Engine.check_prompt`)."""
        groups: dict[int, list[StartItem]] = {}
        for it in items:
            groups.setdefault(self.engine.bucket(len(it.prompt_ids), self.engine.max_len), []).append(it)
        for grp in groups.values():
            prefix = self.engine.prefill([list(it.prompt_ids) for it in grp])
            slots, src, sps, seeds, idx, budgets = [], [], [], [], [], []
            for g, it in enumerate(grp):
                for i, s in enumerate(it.slots):
                    slots.append(s)
                    src.append(g)
                    sps.append(it.sampling)
                    seeds.append(it.seed)
                    idx.append(i)
                    budgets.append(it.budget)
                    self.length[s] = len(it.prompt_ids)
            self._first(slots, self.engine.insert(prefix, slots, sps, seeds, idx, budgets, src))

    def extend_problem(self, slot: int, n_tokens: int) -> Optional[EngineError]:
        """Why ``n_tokens`` cannot be appended to ``slot`` now (None when they can)."""
        if slot in self.active:
            return EngineError(f"slot {slot} is still generating; extend it after its turn ended")
        return self.engine.extend_problem(slot, n_tokens, int(self.length[slot]) - 1)

    def extend(self, items: Sequence[tuple[int, Sequence[int], int]]) -> dict[int, EngineError]:
        """Append ``(slot, token_ids, budget)`` for every item whose turn has ended, in as few device
        calls as there are tool-text buckets. Items that cannot be served are left out and returned
        as ``{slot: EngineError}``; the others continue."""
        errors, ok = {}, []
        for s, ids, budget in items:
            err = self.extend_problem(s, len(ids))
            if err:
                errors[s] = err
            else:
                ok.append((s, list(ids), budget))
        if ok:
            slots = [s for s, _, _ in ok]
            lengths = [int(self.length[s]) - 1 for s in slots]  # the pending token is not cached yet
            for idx, out in self.engine.extend_many(slots, [ids for _, ids, _ in ok], [b for _, _, b in ok],
                                                    lengths=lengths):
                self._first([slots[j] for j in idx], out)
            for s, ids, _ in ok:
                self.length[s] += len(ids)
        return errors

    def dispatch(self) -> list[Dispatched]:
        """Queue a decode call when a slot may still generate, and return what to read back now:
        everything dispatched before it (or the call itself when nothing else is pending)."""
        new = bool(self.active) and self.engine.may_generate(sorted(self.active))
        if new:
            self.queue.append(Dispatched("step", [], self.turn.copy(), self.engine.step_async()))
        if new and len(self.queue) > 1:
            ready, self.queue = self.queue[:-1], self.queue[-1:]
        else:
            ready, self.queue = self.queue, []
        return ready

    def harvest(self, entries: Sequence[Dispatched], fetched: Sequence[Any]) -> dict[int, tuple]:
        """Host copies ``fetched`` of ``entries``' outputs -> ``{slot: (tokens, logprobs, ended)}`` for the
        slots that produced tokens or ended (in dispatch order; stale outputs are skipped)."""
        events: dict[int, list] = {}

        def add(s, toks, lps, ended):
            ev = events.setdefault(s, [[], [], False])
            ev[0].extend(toks)
            ev[1].extend(lps)
            self.length[s] += len(toks)
            if ended:
                ev[2] = True
                self.active.discard(s)

        for e, out in zip(entries, fetched):
            if e.kind == "first":
                tok, lp, act = out[:3]
                for j, s in enumerate(e.slots):
                    if s in self.active and e.turns[s] == self.turn[s]:
                        add(s, [int(tok[j])], [float(lp[j])], not bool(act[j]))
            else:
                tok, lp, emitted, act = out
                for s in sorted(self.active):
                    if e.turns[s] != self.turn[s]:
                        continue
                    sel = emitted[:, s]
                    add(s, tok[sel, s].tolist(), lp[sel, s].tolist(), not bool(act[s]))
        return {s: (t, l, d) for s, (t, l, d) in events.items()}


def generate(engine: Engine, requests: Sequence[Request], progress: Any = None) -> list[Completion]:
    """Complete every request (``n`` samples each) on ``engine`` with continuous batching (a
    :class:`SlotScheduler`). Results are returned in request order, samples in index order."""
    for r in requests:
        if r.n > engine.num_slots:
            raise EngineError(f"request {r.id!r} asks n={r.n} samples but there are only {engine.num_slots} "
                              "decode slots; raise rollout.num_slots or lower n")
        if r.max_new_tokens < 1:
            raise EngineError(f"request {r.id!r}: max_new_tokens must be >= 1")
        if len(r.prompt_ids) >= engine.max_len:
            raise EngineError(f"request {r.id!r}: prompt has {len(r.prompt_ids)} tokens but a slot holds "
                              f"{engine.max_len} (rollout max length)")
        if r.stop_strings and engine.tokenizer is None:
            raise EngineError("stop strings need the engine to have a tokenizer")
    sched = SlotScheduler(engine)
    queue = deque(range(len(requests)))
    live: dict[int, dict] = {}  # slot -> {req, idx, tokens, logprobs}
    results: dict[tuple[int, int], Completion] = {}

    def close(slot: int, reason: str) -> None:
        rec = live.pop(slot)
        r = requests[rec["req"]]
        results[(rec["req"], rec["idx"])] = Completion(
            r.id, rec["idx"], list(r.prompt_ids), rec["tokens"], rec["logprobs"], reason,
            engine.tokenizer.decode(rec["tokens"]) if engine.tokenizer is not None else None)
        sched.release(slot)
        if progress is not None:
            progress.update(1)

    def reason_for(rec: dict) -> str:
        r = requests[rec["req"]]
        if rec["tokens"] and int(rec["tokens"][-1]) in engine.stop_set:
            return "stop"
        if len(rec["tokens"]) >= r.max_new_tokens:
            return "length"
        return "context"

    def check_stop_strings(slot: int, rec: dict) -> bool:
        r = requests[rec["req"]]
        if not r.stop_strings:
            return False
        text = engine.tokenizer.decode(rec["tokens"])
        hits = [text.find(s) + len(s) for s in r.stop_strings if s in text]
        if not hits:
            return False
        end = min(hits)
        keep = next(i for i in range(1, len(rec["tokens"]) + 1)
                    if len(engine.tokenizer.decode(rec["tokens"][:i])) >= end)
        rec["tokens"], rec["logprobs"] = rec["tokens"][:keep], rec["logprobs"][:keep]
        engine.finish(slot, len(r.prompt_ids) + keep - 1)
        return True

    while queue or sched.busy():
        items = []
        while queue and sched.num_free >= requests[queue[0]].n:
            ri = queue.popleft()
            r = requests[ri]
            slots = sched.acquire(r.n)
            items.append(StartItem(r.prompt_ids, slots, r.sampling, r.seed,
                                   min(r.max_new_tokens, engine.max_len - len(r.prompt_ids))))
            for i, s in enumerate(slots):
                live[s] = {"req": ri, "idx": i, "tokens": [], "logprobs": []}
        if items:
            sched.start(items)
        # The next decode call is dispatched before the previous one is read back, so the host
        # work below (detokenising, stop strings) overlaps the device.
        entries = sched.dispatch()
        for s, (toks, lps, ended) in sched.harvest(entries, jax.device_get([e.out for e in entries])).items():
            rec = live[s]
            rec["tokens"].extend(toks)
            rec["logprobs"].extend(lps)
            if check_stop_strings(s, rec):
                close(s, "stop_string")
            elif ended:
                close(s, reason_for(rec))
    return [results[(ri, i)] for ri in range(len(requests)) for i in range(requests[ri].n)]
