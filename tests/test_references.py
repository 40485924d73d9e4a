"""Every reference in the repository resolves inside it, and its text speaks of the project.

Over every tracked text file (`git ls-files`; a walk of the tree where git is absent):

  * no path outside the repository: a sibling folder of the checkout, absolute paths under /work, /home,
    /root, /Users, /opt, `file://` URLs, markdown links whose target leaves the root;
  * no words about how the project was made instead of what it is: "(issue N)",
    "the issue", source-survey folders or their nicknames, "this session" and the like (papers are
    cited by title and arXiv id, our own files by path);
  * every repository path mentioned -- in backticks, in markdown links, or as a bare
    `folder/file.ext` in prose or docstrings -- exists, relative to the repository root or
    to the citing file's folder; `path.py:name` also needs `name` in that file. Module
    names (`kvjax.generate`) are not paths and are not checked. Paths that launchers and
    notebooks *write* are listed in `GENERATED` (an explicit, short list).

The scanners are tested on hand-written cases first, so a green repository scan means
the checks ran, not that they matched nothing.
"""

from __future__ import annotations

import os
import re
import subprocess

_SH = "sha" + "red"     # a sibling folder name, built so this file does not contain it
_SD = "se" + "ed"       # the nickname of the source surveys, likewise
_IS = "is" + "sue"      # a tracker word, likewise

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.relpath(os.path.abspath(__file__), ROOT)   # holds the patterns themselves

TEXT_EXT = (".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh", ".yml", ".yaml", ".ipynb")
TEXT_NAMES = (".ci/run", ".gitignore")
# Paths in prose are checked when they name sources or docs; data files (whose names in
# prose are often placeholders such as step_dir/checksums.json) only in backticks or links.
PROSE_EXT = ("py", "md", "toml", "txt", "ipynb", "sh", "cfg", "yaml", "yml")
CHECKED_EXT = PROSE_EXT + ("json", "jsonl", "csv", "png", "safetensors", "npz", "gguf")

# Outputs of launchers, notebooks and tests (written at run time, not shipped), and
# folders whose paths are relative to something other than this repository.
GENERATED = (
    "compare_results/",        # experiments.compare --out_dir default
    "quickstart_out/",         # notebooks/quickstart.py
    "custom_press_out/",       # notebooks/custom_press.py
    "train_cache_aware_out/",  # notebooks/train_cache_aware.py
    "export/", "checkpoints/", "tensorboard/",   # train.main --workdir layout
)
# Files whose bare `folder/file.py` paths point into another package, as the file says
# (its links and every other check still apply).
FOREIGN_TREES = {
    "tests/fixtures/hf/NOTES.md": "the installed transformers package",
}

OUTSIDE = [
    (re.compile(r"\.\./" + _SH + r"\b"), "link to a sibling folder"),
    (re.compile(r"(?<![\w.~$}>-])/(?:work|home|root|Users|opt|srv|scratch)/[\w.-]"),
     "absolute path outside the repository"),
    (re.compile(r"\bfile://"), "file:// URL"),
]
PROCESS = [
    (re.compile(r"\(\s*issues?\s*#?\d+\s*\)", re.I), "(issue N)"),
    (re.compile(r"\bissues?\s*#\d+", re.I), "issue #N"),
    (re.compile(r"\bissue\s+\d+\b", re.I), "issue N"),
    (re.compile(r"(?<![A-Za-z])(?:the|this|that|open|separate)[ _]issues?(?:'s)?(?![A-Za-z])",
                re.I), "the issue"),
    (re.compile(r"\b" + _SD + r"s?/"), "a survey folder"),
    (re.compile(r"\bthe " + _SD + r"s(?:'|\u2019)", re.I), "survey nickname"),
    (re.compile(r"\bin the " + _SD + r"s\b", re.I), "survey nickname"),
    (re.compile(r"\b" + _SD + r"s?' headline|\b" + _SD + r" headline\b", re.I),
     "survey headline"),
    (re.compile(r"\b(?:this|that|the|these|those|previous|earlier|next|later|each|every|"
                r"one|a|an|other|coding|agent|helper)\s+sessions?\b", re.I), "session"),
]

_URL = re.compile(r"\b[a-zA-Z][\w+.-]*://\S+")
_BACKTICK = re.compile(r"`([^`\n]+)`")
_MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
def _path_re(exts):
  return re.compile(
      r"(?<![\w./~$<>{}-])((?:[\w-][\w.-]*/)+[\w-][\w.-]*\.(?:" + "|".join(exts) + r"))"
      r"(?::([A-Za-z_][\w.]*))?(?![\w/-])")


_PATH = _path_re(CHECKED_EXT)
_PROSE_PATH = _path_re(PROSE_EXT)
_FOREIGN = re.compile(r"[\w.-]+'s\s+`?$")   # "ggml's docs/gguf.md": another project's file
_UPPER_MD = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b")


def tracked_files() -> list[str]:
  try:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                         check=True, timeout=60).stdout.decode()
    files = [f for f in out.split("\0") if f]
  except (OSError, subprocess.SubprocessError):
    files = []
    for d, dirs, names in os.walk(ROOT):
      dirs[:] = [x for x in dirs if not x.startswith(".") or x == ".ci"]
      files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names]
  return sorted(f for f in files if os.path.isfile(os.path.join(ROOT, f)))


def text_files() -> list[str]:
  return [f for f in tracked_files()
          if (f.endswith(TEXT_EXT) or f in TEXT_NAMES) and f != SELF]


def _exists(rel: str, citing: str, root: str) -> bool:
  rel = rel.rstrip("/")
  bases = [root, os.path.join(root, os.path.dirname(citing)), os.path.join(root, "docs")]
  for b in bases:
    p = os.path.normpath(os.path.join(b, rel))
    if os.path.commonpath([p, root]) == root and os.path.exists(p):
      return True
  return False


def _defines(rel: str, citing: str, root: str, name: str) -> bool:
  for b in (root, os.path.join(root, os.path.dirname(citing))):
    p = os.path.normpath(os.path.join(b, rel))
    if os.path.isfile(p):
      with open(p, encoding="utf-8", errors="replace") as f:
        if re.search(r"\b" + re.escape(name.split(".")[0]) + r"\b", f.read()):
          return True
  return False


def _ignored(path: str, citing: str) -> bool:
  return any(path.startswith(g) or ("/" + g) in path for g in GENERATED)


def scan_text(text: str, citing: str, root: str = ROOT) -> list[str]:
  """Problems in one file's text, as 'citing:line: what'."""
  problems = []
  for lineno, line in enumerate(text.splitlines(), 1):
    where = f"{citing}:{lineno}"
    for pat, what in OUTSIDE + PROCESS:
      m = pat.search(line)
      if m:
        problems.append(f"{where}: {what}: {m.group(0)!r}")
    for m in (_MD_LINK.finditer(line) if citing.endswith((".md", ".ipynb")) else ()):
      target = m.group(1).split("#", 1)[0]
      if not target or re.match(r"^[a-zA-Z][\w+.-]*:", target):
        continue                       # anchor only, or a URL / mailto
      p = os.path.normpath(os.path.join(root, os.path.dirname(citing), target))
      if os.path.commonpath([p, root]) != root:
        problems.append(f"{where}: link leaves the repository: {target!r}")
      elif not os.path.exists(p) and not _ignored(target, citing):
        problems.append(f"{where}: link to a missing file: {target!r}")
    bare = _URL.sub(" ", line)
    candidates = [(m.group(1), m.group(2)) for m in _PROSE_PATH.finditer(bare)
                  if not _FOREIGN.search(bare[:m.start()])]
    for tm in _BACKTICK.finditer(bare):
      if _FOREIGN.search(bare[:tm.start()]):
        continue
      whole = _PATH.fullmatch(tm.group(1).strip())
      if whole and (whole.group(1), whole.group(2)) not in candidates:
        candidates.append((whole.group(1), whole.group(2)))
    for path, name in candidates:
      if _ignored(path, citing) or citing in FOREIGN_TREES:
        continue
      if not _exists(path, citing, root):
        problems.append(f"{where}: no such file in the repository: {path!r}")
      elif name and not _defines(path, citing, root, name):
        problems.append(f"{where}: {path} has no {name!r}")
    for m in _UPPER_MD.finditer(bare):
      if not _exists(m.group(1), citing, root):
        problems.append(f"{where}: no such file in the repository: {m.group(1)!r}")
  return problems


# --- the scanners on hand-written cases --------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "GUIDE.md").write_text("# guide\n")
  (tmp_path / "train" / "configs").mkdir(parents=True)
  (tmp_path / "train" / "configs" / "convert.py").write_text('STUDENTS = {"gla": 1}\n')
  (tmp_path / "README.md").write_text("# readme\n")
  return str(tmp_path)


@pytest.mark.parametrize("line", [
    "See `../" + _SH + "/DESIGN.md` for the architecture.",
    "the surveys in ../" + _SH + "/" + _SD + "s call for",
    "/" + "work/venv-hf/bin/python make.py",
    "The question (" + _IS + " 9): how many sequences",
    "The " + _IS + "'s claim under test:",
    "The " + _IS + " asked for >= 90%",
    "The " + _SD + "s' headline to beat is 3.1x",
    "no device was available in the sessions that wrote these kernels",
    "def test_registry_names_the_issue_families():",
    "python -m train.convert --config=train/configs/convert_gla.py --workdir=/tmp/conv",
    "Protocol (DESIGN.md, 'Evaluation protocol').",
    "[the guide](docs/MISSING.md)",
    "[escape](../../outside.md)",
    "`train/configs/convert.py:retnet`",
    "see `models/default/missing.json`",
])
def test_scanner_flags(tree, line):
  assert scan_text(line, "README.md", tree), line


@pytest.mark.parametrize("line", [
    "`kvjax.generate` and `models.prefill` are module names, not paths",
    "python -m train.convert --config=train/configs/convert.py:gla --workdir=/tmp/conv_gla",
    "different seeds give different keys; with seeds disjoint from training",
    "Pallas issues no DMA for pages past the length; the fetch is issued before layer l",
    "See [the guide](docs/GUIDE.md#intro), [KIVI](https://arxiv.org/abs/2402.02750).",
    "see GUIDE.md and `README.md`; https://github.com/kvjax/kvjax/blob/main/x/y.py",
    "writes compare_results/results.csv and quickstart_out/frontier.png",
    "--workdir=$HOME/run, ~/.cache/kvjax/xla, <workdir>/tensorboard/events.txt, /tmp/dm/a.py",
    "GGUF (spec: ggml's docs/gguf.md); jax's `jax/experimental/pallas/ops/tpu/x.py`",
    "Writes step_dir/checksums.json (atomically)",
    "keeps 1/2 of the slots at ratio 0.5; head_dim/2 pairs rotate",
])
def test_scanner_passes(tree, line):
  assert scan_text(line, "README.md", tree) == []


def test_markdown_links_are_read_in_markdown_only(tree):
  code = "return PRESSES[name](self.ratio)"
  assert scan_text(code, "experiments/x.py", tree) == []
  assert scan_text(code, "docs/GUIDE.md", tree)


def test_relative_paths_resolve_from_the_citing_folder(tree):
  assert scan_text("`configs/convert.py`", "train/README.md", tree) == []
  assert scan_text("[up](../README.md)", "docs/GUIDE.md", tree) == []
  assert scan_text("`configs/convert.py`", "README.md", tree)


# --- the repository ---------------------------------------------------------------------------
def test_the_scan_covers_the_repository():
  files = text_files()
  for must in ("README.md", "BUILD.md", "pyproject.toml", "requirements.txt",
               "docs/EVALUATION.md", "docs/ARCHITECTURE.md", "experiments/compare.py"):
    assert must in files, must


def test_every_reference_resolves_inside_the_repository():
  problems = []
  for f in text_files():
    with open(os.path.join(ROOT, f), encoding="utf-8", errors="replace") as fh:
      problems += scan_text(fh.read(), f)
  assert not problems, "\n".join(problems)
