"""Create the built-in demo datasets when they are missing (run by ``make run`` after ``migrate``).

Idempotent: a built-in dataset that is ready and whose file is in storage is left alone, so a second run does
nothing. They are built here, from text inside this Python (``builder.datasets.demo``), with no network; their
statistics are computed in this process, so they are ready before any worker starts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.core.files.storage import default_storage
from django.core.management.base import BaseCommand, CommandParser

from builder.datasets import demo, storage
from builder.datasets.models import DataFormat, Dataset, DatasetState, Origin


def _corpus_description(counts: dict[str, int]) -> str:
    return (
        f"Text for language modelling, made on this machine without any network from the documentation that ships "
        f"inside Python {demo.python_version()} itself: the {counts['topics']} help topics of pydoc_data.topics "
        f"(what help('topics') shows), then the {counts['docstrings']} docstrings of the standard library's modules, "
        "classes and functions, read from the source files with ast (nothing is imported). One example per topic "
        "or docstring, in source order; a 'source' field names where each comes from. It is not cleaned: some "
        "short docstrings are repeated word for word (overridden methods), and some help topics are aliases of "
        "each other, so Clean it to get a deduplicated version."
    )


def _families_description(counts: dict[str, int]) -> str:
    families = "; ".join(f"{family}: {', '.join(modules)}" for family, modules in demo.FAMILIES.items())
    return (
        f"Text classification: which family of the Python {demo.python_version()} standard library a docstring "
        f"comes from. Each of the {sum(counts.values())} examples is a docstring of at least "
        f"{demo.MIN_FAMILY_CHARS} characters, labelled with the family of its top-level module ({families}). "
        "Texts that appear in more than one family are left out and repeats are kept once. The labels come from "
        "where a text sits in the source tree, not from a person: a docstring such as 'Return the value.' says "
        "little about its family, so expect an accuracy well below 100%."
    )


BUILTINS: list[tuple[str, str, str, Callable[[Path], dict[str, int]], Callable[[dict[str, int]], str]]] = [
    (demo.CORPUS_SLUG, "Python documentation corpus", "", demo.build_corpus, _corpus_description),
    (demo.FAMILIES_SLUG, "Standard-library docstring families", "label", demo.build_families, _families_description),
]


class Command(BaseCommand):
    help = "Create the built-in demo datasets (from Python's own documentation) when they are missing."
    # `make run` runs migrate (and its system checks) just before; checking again would import every URL
    # module, and the engine with them, for a command that usually finds nothing to do.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="Rebuild them even when they exist.")

    def handle(self, *args: Any, force: bool = False, **options: Any) -> None:
        for slug, name, label_field, build, describe in BUILTINS:
            existing = Dataset.objects.filter(slug=slug).first()
            if (
                not force
                and existing is not None
                and existing.state == DatasetState.READY
                and existing.file_name
                and default_storage.exists(existing.file_name)
            ):
                continue
            with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
                path = Path(tmp) / f"{slug}.jsonl"
                counts = build(path)
                size = path.stat().st_size
                if existing is not None:
                    storage.delete_quietly(existing.storage_names)
                file_name = storage.save_local_file(
                    f"datasets/builtin/{slug}.jsonl", path, "application/jsonl", move=True
                )
            dataset, _ = Dataset.objects.update_or_create(
                slug=slug,
                defaults={
                    "owner": None,
                    "name": name,
                    "description": describe(counts),
                    "origin": Origin.BUILTIN,
                    "format": DataFormat.JSONL,
                    "text_field": "text",
                    "label_field": label_field,
                    "original_filename": f"{slug}.jsonl",
                    "file_name": file_name,
                    "size_bytes": size,
                    "state": DatasetState.QUEUED,
                    "stats": {},
                },
            )
            # Imported here: it loads the engine (torch), which a run that finds everything in place never needs.
            from builder.datasets import processing

            outcome = processing.analyze_dataset(dataset.pk)
            if outcome["outcome"] != "ready":
                raise RuntimeError(f"built-in dataset {slug} did not validate: {outcome}")
            self.stdout.write(f"Built-in dataset {slug!r}: {outcome['examples']} examples ({size} bytes).")
