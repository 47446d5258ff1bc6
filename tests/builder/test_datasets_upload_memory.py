"""A 200 MB upload streams through the real ASGI server and the worker with bounded memory (RSS measured)."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from rest_framework.authtoken.models import Token

from builder.datasets.models import Dataset, DatasetState
from tests.services import Stack, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

SIZE = 200 * 1024 * 1024
MiB = 1024 * 1024


class PeakRss(threading.Thread):
    """Samples the resident memory of some processes every 10 ms and keeps the peak of their sum."""

    def __init__(self, processes: Callable[[], list[psutil.Process]]) -> None:
        super().__init__(daemon=True)
        self.processes = processes
        self.peak = 0
        self._stop_event = threading.Event()

    def sample(self) -> int:
        total = 0
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):  # a pool child may exit between list and read
                total += process.memory_info().rss
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(0.01)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _write_corpus(path: Path) -> int:
    """About 200 MB of JSON Lines, written in large blocks; returns the number of lines."""
    lines = 0
    filler = "the quick brown fox jumps over the lazy dog " * 4
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < SIZE:
            block = "".join(
                f'{{"text": "{n} {filler}", "label": "{"ab"[n % 2]}"}}\n' for n in range(lines, lines + 10000)
            )
            f.write(block)
            lines += 10000
    return lines


def test_a_200_mb_upload_streams_with_bounded_memory(stack: Stack, alice: Any, tmp_path: Path, artifacts: Path) -> None:
    assert stack.asgi is not None and stack.worker is not None
    corpus = tmp_path / "big.jsonl"
    lines = _write_corpus(corpus)
    size = corpus.stat().st_size
    token = Token.objects.create(user=alice).key
    url = urlsplit(stack.base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=120)
    headers = {"Authorization": f"Token {token}", "Accept": "application/json"}

    def call(method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        conn.request(method, path, body=body, headers={**headers, "Content-Type": content_type})
        response = conn.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None

    web = psutil.Process(stack.asgi.pid)
    web_meter = PeakRss(lambda: [web])
    web_before = web_meter.sample()
    start = json.dumps({"filename": "big.jsonl", "size": size}).encode()
    status, session = call("POST", "/api/datasets/uploads", start)
    assert status == 201, session
    web_meter.start()
    started = time.monotonic()
    with corpus.open("rb") as f:
        offset = 0
        while chunk := f.read(session["chunk_size"]):
            status, body = call("PUT", f"{session['upload_url']}?offset={offset}", chunk, "application/octet-stream")
            assert status == 200, body
            offset += len(chunk)
    upload_seconds = time.monotonic() - started
    web_peak = web_meter.stop()

    worker = psutil.Process(stack.worker.pid)
    worker_meter = PeakRss(lambda: [worker, *worker.children(recursive=True)])
    worker_before = worker_meter.sample()
    worker_meter.start()
    status, dataset = call("POST", f"{session['upload_url']}/complete")
    assert status == 202, dataset
    started = time.monotonic()

    def ready() -> Dataset | None:
        row = Dataset.objects.get(pk=dataset["id"])
        return None if row.is_busy else row

    row: Dataset = wait_for(ready, 180, "the worker to validate 200 MB", interval=0.5)
    analysis_seconds = time.monotonic() - started
    worker_peak = worker_meter.stop()
    assert row.state == DatasetState.READY, row.error_message
    assert row.stats["examples"] == lines and row.size_bytes == size

    figures = {
        "bytes": size,
        "chunk_bytes": session["chunk_size"],
        "upload_seconds": round(upload_seconds, 2),
        "web_rss_before_mib": round(web_before / MiB, 1),
        "web_rss_peak_mib": round(web_peak / MiB, 1),
        "web_rss_growth_mib": round((web_peak - web_before) / MiB, 1),
        "analysis_seconds": round(analysis_seconds, 2),
        "worker_rss_before_mib": round(worker_before / MiB, 1),
        "worker_rss_peak_mib": round(worker_peak / MiB, 1),
        "worker_rss_growth_mib": round((worker_peak - worker_before) / MiB, 1),
    }
    (artifacts / "dataset-upload-memory.json").write_text(json.dumps(figures, indent=2))
    # The web process holds one chunk at a time (plus Django's own buffers), never the 200 MB file.
    assert web_peak - web_before < 64 * MiB, figures
    # The worker keeps 12 bytes per example (~12 MB for these ~1M lines), never the file.
    assert worker_peak - worker_before < 150 * MiB, figures

    status, _ = call("DELETE", f"/api/datasets/{dataset['id']}")
    assert status == 204
    conn.close()
