"""A continuous-batching serving loop over a paged KV cache.

The engine keeps a fixed set of B rows (one compiled batch shape) backed by a paged
ModelCache (kvjax.paged). Requests queue up; each step it

  1. resumes swapped-out requests (oldest first) and admits queued ones into free rows
     while the pool has pages for them (admission control: a request that can never fit
     is rejected at submit with a ValueError naming the sizes);
  2. builds one batch: rows still prefilling feed their next prompt chunk (up to `chunk`
     tokens; chunked prefill, Agrawal et al., 2024 "Sarathi"), decoding rows feed their
     last token; every other row is padding, so finished rows cost no pages;
  3. checks the step's page need against the free list; on a shortfall asks the policy
     (kvjax.policy) for actions -- compress rows with a press, swap rows out to host --
     and, if it returns none, preempts the latest-admitted row by swapping (vLLM);
  4. runs `model.decode(tokens [B, T], cache, attention_mask, logits="last")` (T = 1 when no
     row is prefilling, else `chunk`: two compiled shapes; with `prefill_batch`, prefilling
     rows run on a [prefill_batch, chunk] sub-batch and decoding rows on [B, 1]), samples,
     and retires rows that hit EOS or max_new_tokens, releasing their pages at once;
  5. lets the policy act after the step (e.g. LengthAdaptive compresses fresh prompts).

Shared prefixes (a system prompt) are prefilled once into a reserved row with
`register_prefix`; requests naming it fork that row's pages (kvjax.paged.fork_rows), so
the prefix is stored once however many requests use it, and copy-on-write keeps their
continuations private.

Preemption moves a request out of its row in one of two ways: "swap" copies its pages to
host memory (kvjax.offload) and resumes them bit-exactly; "recompute" (vLLM's other mode)
drops its pages and re-queues it with prompt + generated tokens as its new prompt, which
chunked prefill rebuilds. Pools with a residual window (KIVI pages) always recompute,
since kvjax.offload's row swap moves pages only.

Data-parallel pools (kvjax.paged `partitions=S`, one pool partition per data shard): the
rows [s*B/S, (s+1)*B/S) draw on partition s only. Admission places a request in the
partition with the most free pages that has a free row; a shortfall is resolved inside the
short partition (the policy sees that partition's rows and free pages; the fallback
preempts its latest-admitted row), so the other partitions keep running; a prefix is
prefilled once per partition (each data shard holds its own copy, as each vLLM replica
does).

Bad input: `submit` rejects, with a ValueError naming the sizes, a request that could
never fit one row or one (partition's) pool beside the registered prefixes; the engine's
other requests are untouched.

The model is duck-typed (kvjax never imports models): `model.decode(tokens, cache, *,
attention_mask, logits, check_capacity)` and `model.config`; `make_cache(batch)` returns an
empty ModelCache whose attention layers are PagedKVCache (same pool geometry in every layer).

One file on purpose (about 600 lines): admission, the step loop and the page bookkeeping of
the continuous-batching engine change together.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax import offload
from kvjax import paged
from kvjax import policy as policy_lib
from kvjax.generate import sample


@dataclasses.dataclass
class Request:
  """A generation request and, once served, its result."""

  prompt: Sequence[int]
  max_new_tokens: int = 32
  prefix: Optional[int] = None
  id: int = -1
  output: list = dataclasses.field(default_factory=list)
  status: str = "new"          # queued | prefilling | running | swapped | done | rejected
  error: Optional[str] = None
  submit_step: int = -1
  first_token_step: int = -1
  finish_step: int = -1
  submit_time: float = 0.0
  first_token_time: float = 0.0
  finish_time: float = 0.0
  preemptions: int = 0
  recomputed_tokens: int = 0
  compressions: int = 0


@dataclasses.dataclass
class _Row:
  req: Optional[Request]        # None for a prefix row
  pending: list                 # prompt tokens not yet in the cache
  last: Optional[int] = None    # sampled token not yet fed
  admitted: int = 0
  just_prefilled: bool = False


@dataclasses.dataclass
class _Recompute:
  req: Request                  # preempted by recomputation
  tokens: list                  # prompt + output so far: its prompt when re-admitted
  admitted: int


@dataclasses.dataclass
class _Swapped:
  req: Request
  data: Any                     # offload.SwappedRows
  last: Optional[int]
  pending: list
  pages: int
  admitted: int


class Engine:
  """Continuous batching over a paged cache (see module docstring).

  Args:
    model: decode(tokens, cache, ...) and config (duck-typed).
    make_cache: fn(batch) -> empty paged ModelCache.
    max_batch: rows B (prefix rows included); a multiple of the pool's partitions.
    chunk: prompt tokens fed per step while prefilling.
    policy: a kvjax.policy.Policy (default: preempt only).
    eos_id: stop a request when it samples this id.
    temperature, top_p, top_k, seed: sampling (temperature 0 = greedy).
    watermark: free pages kept in reserve when admitting (room for running rows to grow).
    backend: attention backend passed to decode.
    preemption: "swap" (host memory, exact resume) or "recompute" (drop the pages, re-prefill
      prompt + output later); pools with a residual window always recompute.
    prefill_batch: None: a step with prefilling rows feeds every row a [B, chunk] chunk
      (decoding rows one token of it); an int Bp: prefilling rows (oldest first, up to Bp)
      take a [Bp, chunk] call on a sub-batch of the cache (kvjax.paged.split_rows, no page
      copied) and decoding rows a [B, 1] call, so decoding rows never pay for chunks.
    table_buckets: k > 1 narrows the page tables between steps to the smallest of k widths
      (ceil(max_pages * i / k)) that holds every row (kvjax.paged.with_table_width): the
      reference attention path reads whole tables, so its cost then follows the longest
      live row instead of max_pages; one compile per width. 1: tables stay max_pages wide.
  """

  PREEMPTION = ("swap", "recompute")

  def __init__(self, model, make_cache: Callable[[int], Any], *, max_batch: int = 8,
               chunk: int = 16, policy: Optional[policy_lib.Policy] = None,
               eos_id: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int = 0, watermark: int = 1, backend: str = "auto",
               preemption: str = "swap", prefill_batch: Optional[int] = None,
               table_buckets: int = 1):
    for name, val, lo in (("max_batch", max_batch, 1), ("chunk", chunk, 1),
                          ("watermark", watermark, 0)):
      if not isinstance(val, (int, np.integer)) or val < lo:
        raise ValueError(f"{name}={val!r}; must be an int >= {lo}")
    if preemption not in self.PREEMPTION:
      raise ValueError(f"preemption={preemption!r}; allowed: {self.PREEMPTION}")
    self.model = model
    self.cache = make_cache(max_batch)
    segs = [s for s in self.cache.segments if cache_lib.caps(s).paged]
    if not segs:
      raise ValueError("make_cache must build a ModelCache with PagedKVCache layers")
    geo = {(s.num_pages, s.page_size, s.max_pages, s.partitions, s.residual) for s in segs}
    if len(geo) != 1:
      raise ValueError(f"every paged layer needs the same pool geometry (num_pages, "
                       f"page_size, max_pages, partitions, residual); got {sorted(geo)}")
    self.num_pages, self.page_size, self.max_pages, self.partitions, residual = geo.pop()
    self.capacity = self._probe.capacity
    self.pages_per_partition = self.num_pages // self.partitions
    self.rows_per_partition = max_batch // self.partitions
    self.max_batch, self.chunk, self.watermark = max_batch, chunk, watermark
    self.preemption = "recompute" if residual else preemption
    if prefill_batch is not None:
      if not isinstance(prefill_batch, (int, np.integer)) or not 1 <= prefill_batch <= max_batch:
        raise ValueError(f"prefill_batch={prefill_batch!r}; must be None or an int in "
                         f"[1, max_batch={max_batch}]")
      if self.partitions != 1 or len(segs) != len(self.cache.segments):
        raise ValueError("prefill_batch needs a cache of single-partition paged layers only "
                         f"(partitions={self.partitions}); use prefill_batch=None")
    self.prefill_batch = prefill_batch
    if not isinstance(table_buckets, (int, np.integer)) or table_buckets < 1:
      raise ValueError(f"table_buckets={table_buckets!r}; must be an int >= 1")
    m = self.max_pages
    self.widths = sorted({-(-m * i // table_buckets) for i in range(1, table_buckets + 1)})
    self.policy = policy if policy is not None else policy_lib.Policy()
    self.eos_id, self.backend = eos_id, backend
    self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    self.key = jax.random.key(seed)
    self.rows: list = [None] * max_batch
    self.queue: list = []         # Request (new) or _Recompute (preempted), FIFO
    self.swapped: list = []
    self.done: list = []
    self.prefixes: dict = {}      # id -> (rows, length): one prefix row per partition
    self.step_count = 0
    self._ids = itertools.count()
    self._admit_seq = itertools.count()
    self.stats = dict(steps=0, decode_calls=0, prefill_steps=0, tokens_generated=0,
                      prompt_tokens=0, swaps_out=0, swaps_in=0, recomputes=0,
                      recomputed_tokens=0, compressions=0, peak_pages=0, peak_running=0,
                      rejected=0, model_seconds=0.0)

  # -- requests ---------------------------------------------------------------------------------
  def register_prefix(self, tokens: Sequence[int]) -> int:
    """Prefills a shared prefix into a reserved row (one per pool partition); returns its id
    for Request.prefix."""
    tokens = [int(t) for t in tokens]
    if not tokens:
      raise ValueError("a prefix needs at least one token")
    paged.check_request(self._probe, len(tokens), self.max_pages)
    rows = []
    for part in range(self.partitions):
      row = self._free_row(part)
      if row is None:
        raise ValueError(f"no free row for a prefix in pool partition {part} "
                         f"(max_batch={self.max_batch}, partitions={self.partitions})")
      rows.append(row)
      self.rows[row] = _Row(None, list(tokens), admitted=next(self._admit_seq))
    while self.rows[rows[0]].pending:
      self._step_rows(rows)
    pid = len(self.prefixes)
    self.prefixes[pid] = (tuple(rows), len(tokens))
    return pid

  def submit(self, prompt, max_new_tokens: int = 32, prefix: Optional[int] = None) -> Request:
    """Queues a request. Raises ValueError if it could never fit one row / the pool."""
    req = prompt if isinstance(prompt, Request) else Request(list(prompt), max_new_tokens,
                                                             prefix)
    req.prompt = [int(t) for t in req.prompt]
    if not req.prompt:
      raise ValueError("a request needs at least one prompt token")
    if req.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={req.max_new_tokens}; must be >= 1")
    if req.prefix is not None and req.prefix not in self.prefixes:
      raise ValueError(f"prefix={req.prefix} is not registered ({sorted(self.prefixes)})")
    plen = self.prefixes[req.prefix][1] if req.prefix is not None else 0
    total = plen + len(req.prompt) + req.max_new_tokens
    what = (f"prefix {plen} + prompt {len(req.prompt)} + max_new_tokens "
            f"{req.max_new_tokens} = {total} tokens")
    try:
      paged.check_request(self._probe, total, self.max_pages)
      # Prefix rows hold their pages for good; a request shares their full pages.
      room = min(self.pages_per_partition - self._prefix_pages(part)
                 for part in range(self.partitions))
      need = self._probe.pages_for(total) - self._shared_pages(req.prefix)
      if need > room:
        where = "" if self.partitions == 1 else " in every pool partition"
        raise ValueError(f"needs {need} pages of page_size={self.page_size} beyond the shared "
                         f"prefix, but only {room} of num_pages={self.num_pages} are not "
                         f"held by prefixes{where}")
    except ValueError as e:
      req.status, req.error = "rejected", str(e)
      self.stats["rejected"] += 1
      raise ValueError(f"request rejected: {what}: {e}") from e
    req.id = next(self._ids)
    req.status = "queued"
    req.submit_step, req.submit_time = self.step_count, time.perf_counter()
    self.queue.append(req)
    return req

  @property
  def busy(self) -> bool:
    return bool(self.queue or self.swapped or any(
        r is not None and r.req is not None for r in self.rows))

  @property
  def running(self) -> int:
    """Requests holding a row now."""
    return sum(r is not None and r.req is not None for r in self.rows)

  def run(self, requests: Sequence = (), *, max_steps: Optional[int] = None,
          callback: Optional[Callable[["Engine"], None]] = None) -> list:
    """Submits requests and steps until every request is done; returns them in order."""
    reqs = [self.submit(r) for r in requests]
    n = 0
    while self.busy:
      if max_steps is not None and n >= max_steps:
        break
      self.step()
      n += 1
      if callback is not None:
        callback(self)
    return reqs

  # -- the step -----------------------------------------------------------------------------------
  def step(self) -> list:
    """One engine step. Returns the requests that finished in it."""
    self._resume_and_admit()
    active = [i for i, r in enumerate(self.rows) if r is not None and r.req is not None]
    if not active:
      if self.queue or self.swapped:
        raise RuntimeError(
            f"engine stalled: {len(self.queue)} queued / {len(self.swapped)} swapped requests "
            f"but nothing runs and only {self._free_pages()} of {self.num_pages} pages are "
            f"free (prefix rows hold the rest?); watermark={self.watermark}")
      return []
    finished = self._step_rows(active)
    self._apply(self.policy.after_step(self._view(0)))
    for r in self.rows:
      if r is not None:
        r.just_prefilled = False
    return finished

  def _step_rows(self, rows: list) -> list:
    if self.prefill_batch:
      # decoding rows all step; prefilling rows (oldest first) up to the prefill batch
      pre = sorted((r for r in rows if self.rows[r].pending), key=lambda r: self.rows[r].admitted)
      rows = [r for r in rows if not self.rows[r].pending] + pre[:self.prefill_batch]
    self._fit_width(rows)
    rows = self._make_room(rows)
    if not rows:
      return []
    pre = [r for r in rows if self.rows[r].pending]
    fed, ids = {}, {}
    t0 = time.perf_counter()
    if self.prefill_batch and pre:
      self._call(pre, self.chunk, fed, ids, sub=True)
      if len(pre) < len(rows):
        self._call([r for r in rows if r not in fed], 1, fed, ids)
    else:
      self._call(rows, self.chunk if pre else 1, fed, ids)
    self.stats["model_seconds"] += time.perf_counter() - t0
    if paged.overflowed(self.cache):  # the page check above makes this unreachable
      raise RuntimeError("paged cache overflowed despite the page check (engine bug)")
    self.stats["prefill_steps"] += int(bool(pre))
    self.stats["peak_pages"] = max(self.stats["peak_pages"], self._used_pages())
    self.stats["peak_running"] = max(self.stats["peak_running"], self.running)
    self.step_count += 1
    self.stats["steps"] = self.step_count
    finished = []
    now = time.perf_counter()
    for r in rows:
      st = self.rows[r]
      kind, n = fed[r]
      if kind == "prompt":
        del st.pending[:n]
        if st.req is not None:
          self.stats["prompt_tokens"] += n
        if st.pending:
          continue
        st.just_prefilled = True
        if st.req is None:       # a prefix row: nothing to sample
          continue
      req = st.req
      tok = ids[r]
      req.output.append(tok)
      self.stats["tokens_generated"] += 1
      if req.first_token_step < 0:
        req.first_token_step, req.first_token_time = self.step_count, now
      req.status = "running"
      st.last = tok
      if len(req.output) >= req.max_new_tokens or (self.eos_id is not None
                                                   and tok == self.eos_id):
        req.status = "done"
        req.finish_step, req.finish_time = self.step_count, now
        self.cache = paged.release_rows(self.cache, [r])
        self.rows[r] = None
        self.done.append(req)
        finished.append(req)
    return finished

  def _call(self, rows: list, t: int, fed: dict, ids: dict, sub: bool = False):
    """One model call feeding up to t tokens to each of `rows` (pending prompt tokens, else
    the last sampled token); fills fed[row] = (kind, n) and ids[row] = sampled id. sub: run
    on a [prefill_batch, t] sub-batch of the rows (kvjax.paged.split_rows), else on all B."""
    b = self.prefill_batch if sub else self.max_batch
    idx = list(rows)
    if sub:   # distinct filler rows (fed nothing) complete the static sub-batch
      idx += [i for i in range(self.max_batch) if i not in rows][:b - len(rows)]
    tokens = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.int32)
    for j, r in enumerate(rows):
      st = self.rows[r]
      piece = st.pending[:t] if st.pending else [st.last]
      fed[r] = ("prompt" if st.pending else "token", len(piece))
      pos = j if sub else r
      tokens[pos, :len(piece)] = piece
      mask[pos, :len(piece)] = 1
    kw = dict(attention_mask=jnp.asarray(mask), logits="last", check_capacity=False,
              backend=self.backend)
    if sub:
      sel = jnp.asarray(idx, jnp.int32)
      part, rest = paged.split_rows(self.cache, sel)
      logits, part = self.model.decode(jnp.asarray(tokens), part, **kw)
      self.cache = paged.join_rows(rest, part, sel)
    else:
      logits, self.cache = self.model.decode(jnp.asarray(tokens), self.cache, **kw)
    self.key, key = jax.random.split(self.key)
    out = np.asarray(sample(logits[:, -1], key, **self.sampling))
    self.stats["decode_calls"] += 1
    for j, r in enumerate(rows):
      ids[r] = int(out[j if sub else r])

  # -- pages: admission, pressure, actions --------------------------------------------------------
  @property
  def _probe(self):
    """The first paged entry: every layer sees the same appends, so one answers for all."""
    return next(s for s in self.cache.segments if cache_lib.caps(s).paged)

  def _meta(self, name: str) -> np.ndarray:
    """A table of layer 0 of the probe entry, on the host."""
    s = self._probe
    a = getattr(s, name)
    return np.asarray(a[0] if s.stacked else a)

  def _part(self, row: int) -> int:
    return row // self.rows_per_partition

  def _free_pages(self, part: Optional[int] = None) -> int:
    """Free pages (worst layer) of the pool, or of partition `part`."""
    s = self._probe
    if part is None or self.partitions == 1:
      return int(np.asarray(s.num_free).reshape(-1).min())
    return int(np.asarray(s.part_free).reshape(-1, self.partitions)[:, part].min())

  def _used_pages(self) -> int:
    return self.num_pages - self._free_pages()

  def _free_row(self, part: Optional[int] = None) -> Optional[int]:
    for i, r in enumerate(self.rows):
      if r is None and (part is None or self._part(i) == part):
        return i
    return None

  def _prefix_pages(self, part: int) -> int:
    return sum(self._row_pages(rows[part])[0] for rows, _ in self.prefixes.values())

  def _shared_pages(self, prefix: Optional[int]) -> int:
    """Pages a request naming `prefix` shares for good (the prefix's full pages)."""
    if prefix is None:
      return 0
    return self._probe.flushed_tokens(self.prefixes[prefix][1]) // self.page_size

  def _place(self, need: int) -> Optional[tuple]:
    """(row, partition) for a request needing `need` pages: the partition with the most
    free pages that has a free row and room beyond the watermark; None if none."""
    best = None
    for part in range(self.partitions):
      row = self._free_row(part)
      free = self._free_pages(part) - self.watermark
      if row is not None and need <= free and (best is None or free > best[2]):
        best = (row, part, free)
    return None if best is None else best[:2]

  def _resume_and_admit(self):
    while self.swapped:
      sw = self.swapped[0]
      spot = self._place(sw.pages)
      if spot is None:
        return  # resume before admitting anything new (FIFO fairness)
      row = spot[0]
      self.swapped.pop(0)
      self._fit_width([], at_least=sw.pages)
      self.cache = offload.swap_in_rows(self.cache, sw.data, [row])
      self.rows[row] = _Row(sw.req, sw.pending, sw.last, sw.admitted)
      sw.req.status = "running" if not sw.pending else "prefilling"
      self.stats["swaps_in"] += 1
    while self.queue:
      item = self.queue[0]
      req = item.req if isinstance(item, _Recompute) else item
      tokens = item.tokens if isinstance(item, _Recompute) else req.prompt
      plen = self.prefixes[req.prefix][1] if req.prefix is not None else 0
      first = min(len(tokens), self.chunk)
      # Pages its first chunk needs: full prefix pages are shared, the partial one is copied.
      need = self._probe.pages_for(plen + first) - self._shared_pages(req.prefix)
      spot = self._place(need)
      if spot is None:
        return
      row, part = spot
      self.queue.pop(0)
      if req.prefix is not None:
        src = self.prefixes[req.prefix][0][part]
        self.cache = paged.fork_rows(self.cache, [src], [row], plen)
      admitted = item.admitted if isinstance(item, _Recompute) else next(self._admit_seq)
      self.rows[row] = _Row(req, list(tokens), admitted=admitted)
      req.status = "prefilling"

  def _fit_width(self, rows: list, at_least: int = 0):
    """Narrows / widens the page tables to the smallest width that holds every row after
    stepping `rows` (and at least `at_least` pages)."""
    if len(self.widths) == 1:
      return
    probe = self._probe
    held = (self._meta("page_table") >= 0).sum(-1)
    lengths = self._meta("lengths").max(-1)
    t = self.chunk if any(self.rows[r].pending for r in rows) else 1
    need = max(int(held.max(initial=0)), at_least)
    for r in rows:
      st = self.rows[r]
      n = min(len(st.pending), t) if st.pending else 1
      need = max(need, probe.pages_for(int(lengths[r]) + n))
    width = next((w for w in self.widths if w >= need), self.widths[-1])
    if width != probe.max_pages:
      self.cache = paged.with_table_width(self.cache, width)

  def _step_need(self, rows) -> np.ndarray:
    """Head-wise positions [B, Hkv, T] of the pending step (for the page check)."""
    t = self.chunk if any(self.rows[r].pending for r in rows) else 1
    pos = np.full((self.max_batch, t), -1, np.int32)
    nxt = np.asarray(self.cache.next_position)
    for r in rows:
      st = self.rows[r]
      n = min(len(st.pending), t) if st.pending else 1
      pos[r, :n] = nxt[r] + np.arange(n)
    h = self._probe.kv_heads
    return jnp.asarray(np.broadcast_to(pos[:, None, :], (self.max_batch, h, t)))

  def _make_room(self, rows: list) -> list:
    """Applies policy actions (then preemption) until the step's pages fit; returns rows.

    A shortfall is resolved inside the partition that is short: the policy sees its rows
    and free pages, and the fallback preempts its latest-admitted request."""
    for _ in range(4 * self.max_batch + 4):
      try:
        paged.check_admission(self._probe, self._step_need(rows))
        return rows
      except paged.OutOfPages as e:
        needed, free, part = e.needed, e.free, e.partition
      mine = [r for r in rows if part is None or self._part(r) == part]
      view = self._view(needed, part)
      acts = self.policy.on_pressure(view)
      before = (self._free_pages(part), len(rows))
      self._apply(acts)
      rows = [r for r in rows if self.rows[r] is not None]
      mine = [r for r in mine if self.rows[r] is not None]
      if (self._free_pages(part), len(rows)) == before:
        # The policy changed nothing: preempt the latest-admitted request of the partition.
        if len(mine) <= 1:
          raise paged.OutOfPages(needed, free, "Engine (a single request exceeds the pool)",
                                 partition=part)
        latest = max(mine, key=lambda r: self.rows[r].admitted)
        self._apply([policy_lib.SwapOut((latest,))])
        rows = [r for r in rows if self.rows[r] is not None]
    raise RuntimeError("engine could not make room for the step")

  def _apply(self, actions):
    for a in actions:
      if isinstance(a, policy_lib.Compress):
        rows = [r for r in a.rows if self.rows[r] is not None and self.rows[r].req is not None]
        if not rows:
          continue
        cfg = getattr(self.model, "config", None)
        self.cache = paged.PagedPress(a.press).compress_model(self.cache, None, cfg, rows=rows)
        for r in rows:
          self.rows[r].req.compressions += 1
        self.stats["compressions"] += len(rows)
      elif isinstance(a, policy_lib.SwapOut):
        for r in a.rows:
          st = self.rows[r]
          if st is None or st.req is None:
            continue
          if self.preemption == "recompute":
            self._recompute(r)
            continue
          pages = self._row_pages(r)[0]
          data, self.cache = offload.swap_out_rows(self.cache, [r], compress=a.compress)
          self.swapped.append(_Swapped(st.req, data, st.last, st.pending, pages, st.admitted))
          st.req.status = "swapped"
          st.req.preemptions += 1
          self.rows[r] = None
          self.stats["swaps_out"] += 1
        self.swapped.sort(key=lambda s: s.admitted)
      else:
        raise ValueError(f"unknown policy action {a!r}")

  def _recompute(self, r: int):
    """Preempts row r by recomputation: its pages are freed and the request re-queued (in
    admission order, ahead of newer ones) with prompt + output so far as its prompt."""
    st = self.rows[r]
    req = st.req
    tokens = list(req.prompt) + list(req.output)
    self.cache = paged.release_rows(self.cache, [r])
    self.rows[r] = None
    req.status = "queued"
    req.preemptions += 1
    req.recomputed_tokens += len(tokens)
    self.stats["recomputes"] += 1
    self.stats["recomputed_tokens"] += len(tokens)
    item = _Recompute(req, tokens, st.admitted)
    at = next((i for i, q in enumerate(self.queue)
               if not isinstance(q, _Recompute) or q.admitted > st.admitted), len(self.queue))
    self.queue.insert(at, item)

  def _row_pages(self, r, tables=None):
    """(pages row r holds, pages only it holds); tables = (page_table, refcount) on host."""
    pt, rc = tables if tables is not None else (self._meta("page_table"), self._meta("refcount"))
    held = pt[r][pt[r] >= 0]
    return len(held), int((rc[held] == 1).sum())

  def _view(self, needed: int, part: Optional[int] = None) -> policy_lib.PoolView:
    """The pool as a policy sees it: all rows, or those of partition `part` (its pages)."""
    lengths = self._meta("lengths").max(-1)
    tables = (self._meta("page_table"), self._meta("refcount"))   # one host copy per view
    nxt = np.asarray(self.cache.next_position)
    out = []
    for i, st in enumerate(self.rows):
      if st is None or st.req is None or (part is not None and self._part(i) != part):
        continue
      pages, private = self._row_pages(i, tables)
      out.append(policy_lib.RowView(
          row=i, request_id=st.req.id, state="prefilling" if st.pending else "running",
          tokens=int(lengths[i]), position=int(nxt[i]), pages=pages, private_pages=private,
          admitted=st.admitted, compressions=st.req.compressions,
          just_prefilled=st.just_prefilled))
    num = self.num_pages if part is None else self.pages_per_partition
    return policy_lib.PoolView(num_pages=num, page_size=self.page_size,
                               free_pages=self._free_pages(part), needed=int(needed),
                               rows=tuple(out))
