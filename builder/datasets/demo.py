"""The built-in demo datasets, made on this machine from text that ships inside Python itself (no network).

- ``python-docs``: a corpus for language modelling: the help topics of ``pydoc_data.topics`` (what
  ``help("topics")`` shows) and then every docstring of the standard library's modules, classes and functions.
- ``stdlib-docstring-families``: a classification set: docstrings of at least ``MIN_FAMILY_CHARS`` characters,
  each labelled with the family of the standard-library module it comes from (``FAMILIES``).

Docstrings are read from the source files with ``ast``: nothing is imported or executed (importing the whole
standard library has side effects: ``antigravity`` opens a browser). Files are visited in sorted order, so the
datasets are the same on every machine with the same Python version. Pure Python, no Django.
"""

from __future__ import annotations

import ast
import json
import os
import pydoc_data.topics
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CORPUS_SLUG = "python-docs"
FAMILIES_SLUG = "stdlib-docstring-families"
MIN_FAMILY_CHARS = 40

# Top-level standard-library modules grouped into families by what they are for. GUI modules (tkinter, turtle)
# are left out: Debian and others ship them separately, and the dataset should be the same everywhere.
FAMILIES: dict[str, tuple[str, ...]] = {
    "concurrency": (
        "asyncio", "concurrent", "multiprocessing", "threading", "queue", "selectors", "sched", "subprocess",
        "_threading_local", "contextvars",
    ),
    "email": ("email", "mailbox", "smtplib", "imaplib", "poplib", "nntplib", "mimetypes", "quopri"),
    "networking": (
        "http", "urllib", "wsgiref", "xmlrpc", "socket", "socketserver", "ssl", "ftplib", "ipaddress", "telnetlib",
    ),
    "formats": ("xml", "html", "json", "csv", "configparser", "plistlib", "tomllib", "netrc"),
    "testing": ("unittest", "doctest", "pdb", "bdb", "trace", "profile", "cProfile", "pstats", "timeit"),
    "imports": ("importlib", "pkgutil", "modulefinder", "runpy", "zipimport", "site"),
    "numbers": ("_pydecimal", "fractions", "statistics", "numbers", "random", "colorsys"),
    "files": (
        "tarfile", "zipfile", "pathlib", "shutil", "glob", "fnmatch", "gzip", "bz2", "lzma", "tempfile", "filecmp",
        "fileinput", "_pyio", "os", "genericpath", "posixpath", "stat",
    ),
}  # fmt: skip
_FAMILY_OF = {module: family for family, modules in FAMILIES.items() for module in modules}
# Folders of tests, tools and demos: not library documentation.
_SKIP_DIRS = {
    "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages",
    "dist-packages", "__pycache__", "__phello__",
}  # fmt: skip


@dataclass(frozen=True)
class Docstring:
    module: str  # dotted module name, e.g. "asyncio.tasks"
    qualname: str  # "" for the module's own docstring, else e.g. "Task.cancel"
    text: str

    @property
    def source(self) -> str:
        return f"{self.module}:{self.qualname}" if self.qualname else self.module

    @property
    def top_level(self) -> str:
        return self.module.split(".")[0]


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstrings(node: ast.AST, module: str, prefix: str) -> Iterator[Docstring]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            qualname = f"{prefix}{child.name}"
            text = ast.get_docstring(child)
            if text and text.strip():
                yield Docstring(module, qualname, text)
            yield from _docstrings(child, module, f"{qualname}.")


def stdlib_docstrings(root: Path | None = None) -> Iterator[Docstring]:
    """Every non-empty docstring of the standard library's Python sources, in a stable order."""
    root = root or stdlib_dir()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for filename in sorted(files):
            if not filename.endswith(".py"):
                continue
            path = Path(folder) / filename
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError):
                continue  # a few sources are deliberately invalid (templates, bad-syntax fixtures)
            module = _module_name(path.relative_to(root))
            text = ast.get_docstring(tree)
            if text and text.strip():
                yield Docstring(module, "", text)
            yield from _docstrings(tree, module, "")


def _write_jsonl(path: Path, rows: Iterator[dict[str, str]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def build_corpus(path: Path) -> dict[str, int]:
    """Write the ``python-docs`` corpus (JSONL: ``text``, ``source``); returns its counts."""
    topics = pydoc_data.topics.topics
    counts = {"topics": len(topics), "docstrings": 0}

    def rows() -> Iterator[dict[str, str]]:
        for name in sorted(topics):
            yield {"text": topics[name].strip(), "source": f"pydoc_data.topics:{name}"}
        for doc in stdlib_docstrings():
            counts["docstrings"] += 1
            yield {"text": doc.text, "source": doc.source}

    counts["examples"] = _write_jsonl(path, rows())
    return counts


def build_families(path: Path) -> dict[str, int]:
    """Write the ``stdlib-docstring-families`` set (JSONL: ``text``, ``label``, ``source``); returns label counts.

    Texts found in more than one family are left out (their label would be arbitrary), and a text repeated within
    one family is kept once.
    """
    first: dict[str, Docstring] = {}
    families_of: dict[str, set[str]] = {}
    for doc in stdlib_docstrings():
        family = _FAMILY_OF.get(doc.top_level)
        if family is None or len(doc.text) < MIN_FAMILY_CHARS:
            continue
        first.setdefault(doc.text, doc)
        families_of.setdefault(doc.text, set()).add(family)
    counts: dict[str, int] = dict.fromkeys(FAMILIES, 0)

    def rows() -> Iterator[dict[str, str]]:
        for text, doc in first.items():
            if len(families_of[text]) != 1:
                continue
            family = next(iter(families_of[text]))
            counts[family] += 1
            yield {"text": text, "label": family, "source": doc.source}

    _write_jsonl(path, rows())
    return counts
