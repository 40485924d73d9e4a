"""The one table of presses by name: launchers, benches, policies and flags all read it.

A press registers itself where it is defined:

    @registry.register("knorm", query_agnostic=True)
    @dataclasses.dataclass(frozen=True)
    class KnormPress(base.ScorerPress): ...

and is then built by name anywhere:

    press = registry.make("knorm", 0.5)          # KnormPress(compression_ratio=0.5)
    registry.names()                              # every registered name, sorted
    registry.names(provides=())                   # those needing nothing but the cache

Every module of the `kvjax.presses` package is imported before the table is read, so a new
press is one file in kvjax/presses/ (plus its test): it shows up in
`python -m experiments.compare --techniques=help`, the benches' name lists and flag enums,
and the policies, with no other edit. Presses defined elsewhere (a notebook, a test, your
own package) register the same way once their module is imported.

Metadata a consumer filters on:
  query_agnostic  the press decides without seeing the question (kvpress's evaluation
                  protocol). False for presses whose score is the attention of the last
                  prompt queries (SnapKV, TOVA, H2O, ...): in the query-agnostic mode
                  (docs/EVALUATION.md) they score the end of the context, not the
                  question, so they are still usable, but a table should say which mode
                  it ran.
  needs           what the press needs besides the layer cache, from NEEDS below. A
                  consumer that can provide a set of needs lists `names(provides=...)`.

Wrappers register the scorer they wrap by default (`wraps="snapkv"` builds
AdaKVPress(press=make("snapkv", r))); their needs and query-agnosticism are the union /
conjunction of their own and the inner press's.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Iterable, Optional

# What a press may need besides the layer cache, and who provides it.
NEEDS = {
    "colsum": "attention mass per cache slot from the prompt's forward pass (Observe.colsum)",
    "queries": "the last prompt queries (Observe.queries)",
    "rope": "the model's RoPE config (compress_model(..., config))",
    "reconstruction": "per-slot max attention while the model re-reads the context "
                      "(Observe.reconstruction; models.prefill runs the extra forward)",
    "o_proj": "each layer's attention output projection (Observe.o_proj)",
    "head_scores": "a per-(layer, kv head) pattern from calibration (DuoAttention)",
}
# What models.prefill(press=...) / the experiments harness provide.
PREFILL_PROVIDES = frozenset({"colsum", "queries", "rope", "reconstruction", "o_proj"})


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered name.

  Attributes:
    name: the registry name ("snapkv", "adakv", ...).
    cls: the press class.
    query_agnostic: see the module docstring (inner press included for wrappers).
    needs: frozenset of NEEDS keys (inner press included for wrappers).
    summary: one line for help listings.
  """

  name: str
  cls: type
  query_agnostic: bool
  needs: frozenset
  summary: str
  build: Callable[..., Any] = dataclasses.field(repr=False, compare=False, default=None)
  option_names: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class _Spec:
  name: str
  cls: type
  query_agnostic: bool
  needs: frozenset
  wraps: Optional[str]
  defaults: tuple
  factory: Optional[Callable[..., Any]]
  summary: str


_SPECS: dict[str, _Spec] = {}
_loaded = False


def _first_line(doc: Optional[str]) -> str:
  for line in (doc or "").strip().splitlines():
    if line.strip():
      return line.strip()
  return ""


def register(name: str, *, query_agnostic: bool, needs: Iterable[str] = (),
             wraps: Optional[str] = None, defaults: Optional[dict] = None,
             factory: Optional[Callable[..., Any]] = None, summary: Optional[str] = None,
             replace: bool = False):
  """Class decorator: registers `name` -> a factory of the decorated press class.

  Args:
    name: the registry name (lowercase letters, digits, underscores).
    query_agnostic: see the module docstring (the press's own behaviour; a wrapper's entry
      combines it with the wrapped press's).
    needs: keys of NEEDS the press itself needs.
    wraps: registry name of the scorer a wrapper wraps; the factory then builds
      cls(press=make(wraps, ratio), **defaults, **options).
    defaults: keyword arguments fixed for this name (e.g. {"merge": "cam"} registers a
      variant of a class under another name).
    factory: fn(cls, compression_ratio, **options) -> press, for presses whose budget is
      not a `compression_ratio` field (e.g. DuoAttention's head_compression_ratio).
    summary: one line for help listings (default: the class docstring's first line).
    replace: allow re-registering an existing name (otherwise ValueError).

  Stack several decorators on one class to register variants under several names.
  """
  if not isinstance(name, str) or not name or not all(
      c.islower() or c.isdigit() or c == "_" for c in name) or name[0].isdigit():
    raise ValueError(f"press name {name!r}: use lowercase letters, digits and underscores, "
                     "starting with a letter")
  if not isinstance(query_agnostic, bool):
    raise TypeError(f"query_agnostic={query_agnostic!r}; must be True or False")
  needs = frozenset(needs)
  unknown = sorted(needs - set(NEEDS))
  if unknown:
    raise ValueError(f"needs={sorted(needs)}: unknown {unknown}; allowed: {sorted(NEEDS)}")
  if wraps is not None and factory is not None:
    raise ValueError("pass wraps= or factory=, not both")

  def decorate(cls):
    old = _SPECS.get(name)
    redefined = old is not None and (old.cls.__module__, old.cls.__qualname__) == (
        cls.__module__, cls.__qualname__)   # a re-run notebook cell or reloaded module
    if old is not None and not (replace or redefined or old.cls is cls):
      raise ValueError(f"press name {name!r} is already registered to "
                       f"{_SPECS[name].cls.__name__}; pass replace=True to override")
    _SPECS[name] = _Spec(name, cls, query_agnostic, needs, wraps,
                         tuple(sorted((defaults or {}).items())), factory,
                         summary or _first_line(cls.__doc__))
    return cls

  return decorate


def unregister(name: str) -> None:
  """Removes a name (tests that register throwaway presses clean up with this)."""
  _SPECS.pop(name, None)


def _load_builtin() -> None:
  """Imports every module of the kvjax.presses package once (their decorators register)."""
  global _loaded
  if _loaded:
    return
  _loaded = True
  package = importlib.import_module("kvjax.presses")
  for info in pkgutil.iter_modules(package.__path__):
    if not info.name.startswith("_"):
      importlib.import_module(f"kvjax.presses.{info.name}")


def _resolve(name: str, seen: tuple = ()) -> tuple[bool, frozenset]:
  spec = _SPECS[name]
  if spec.wraps is None:
    return spec.query_agnostic, spec.needs
  if spec.wraps in seen or spec.wraps not in _SPECS:
    raise ValueError(f"press {name!r} wraps {spec.wraps!r}, which is "
                     f"{'circular' if spec.wraps in seen else 'not registered'}")
  qa, needs = _resolve(spec.wraps, seen + (name,))
  return spec.query_agnostic and qa, spec.needs | needs


def _option_names(cls) -> frozenset:
  if dataclasses.is_dataclass(cls):
    return frozenset(f.name for f in dataclasses.fields(cls))
  return frozenset()


def get(name: str) -> Entry:
  """The Entry of `name` (ValueError listing the registered names)."""
  _load_builtin()
  if name not in _SPECS:
    raise ValueError(f"unknown press {name!r}; registered: {', '.join(sorted(_SPECS))}")
  spec = _SPECS[name]
  qa, needs = _resolve(name)
  return Entry(name, spec.cls, qa, needs, spec.summary,
               build=lambda ratio, **options: _build(spec, ratio, options),
               option_names=_option_names(spec.cls))


def _build(spec: _Spec, ratio: float, options: dict):
  kw = dict(spec.defaults)
  kw.update(options)
  if spec.factory is not None:
    return spec.factory(spec.cls, ratio, **kw)
  if spec.wraps is not None:
    return spec.cls(press=make(spec.wraps, ratio), **kw)
  return spec.cls(compression_ratio=ratio, **kw)


def make(name: str, compression_ratio: float, **options):
  """A press by name with `compression_ratio` (fraction of tokens removed, kvpress's).

  Args:
    name: a registered name (see names()).
    compression_ratio: float in [0, 1).
    **options: more constructor fields (e.g. window_size=32 for "snapkv"); a wrapper takes
      its own fields here (its inner press gets only the ratio).

  Raises:
    ValueError: unknown name, ratio outside [0, 1), or an option the press does not have.
  """
  entry = get(name)
  if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)) \
      or not 0 <= compression_ratio < 1:
    raise ValueError(f"compression_ratio={compression_ratio!r}; must be a float in [0, 1)")
  if entry.option_names:
    bad = sorted(set(options) - entry.option_names)
    if bad:
      raise ValueError(f"press {name!r} has no option(s) {bad}; allowed: "
                       f"{sorted(entry.option_names - {'press'})}")
  return entry.build(float(compression_ratio), **options)


def accepts(name: str, option: str) -> bool:
  """True if press `name` takes constructor field `option` (e.g. "seed", "window_size")."""
  return option in get(name).option_names


def names(*, query_agnostic: Optional[bool] = None,
          provides: Optional[Iterable[str]] = None) -> tuple[str, ...]:
  """Registered names, sorted.

  Args:
    query_agnostic: keep only presses that are (True) or are not (False) query-agnostic.
    provides: keep only presses whose needs are a subset of these NEEDS keys (() = presses
      that need nothing but the cache).
  """
  _load_builtin()
  have = None if provides is None else frozenset(provides)
  out = []
  for n in sorted(_SPECS):
    qa, needs = _resolve(n)
    if query_agnostic is not None and qa != query_agnostic:
      continue
    if have is not None and not needs <= have:
      continue
    out.append(n)
  return tuple(out)


def entries(**filters) -> tuple[Entry, ...]:
  """Entries of names(**filters)."""
  return tuple(get(n) for n in names(**filters))


def help_text(**filters) -> str:
  """One line per press: name, [query-agnostic], needs, summary."""
  lines = []
  for e in entries(**filters):
    tags = "query-agnostic" if e.query_agnostic else "window/question-sensitive"
    needs = ", ".join(sorted(e.needs)) or "-"
    lines.append(f"  {e.name:<22} {tags:<26} needs: {needs:<28} {e.summary}")
  return "\n".join(lines)
