"""``Client``: the platform's API from Python, over HTTP (httpx) and websockets, signed in with an API token.

Every request goes through ``Client.call`` with the name of an operation of ``operations.OPERATIONS`` (which the
project's tests check against the server's OpenAPI schema). Answers are the API's JSON as plain dicts and lists;
refusals are ``errors.ApiError`` subclasses naming the fields at fault.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from moe_builder_client import credentials
from moe_builder_client.contract import check
from moe_builder_client.errors import (
    ApiError,
    ClientError,
    Conflict,
    FieldError,
    NetworkError,
    NotFound,
    NotSignedIn,
    ReportFailed,
    SpecInvalid,
    WaitTimeout,
    dataset_invalid,
    error_for,
    field_errors,
)
from moe_builder_client.live import JobWatch, Playground, Point
from moe_builder_client.operations import BYTES, OPERATIONS

Progress = Callable[[int, int], None]
TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
REPORT_FORMATS = ("pdf", "json", "md", "html")


class Client:
    """The API of the platform at ``url`` (``http://127.0.0.1:8000``), as the owner of ``token``.

    Without arguments: ``MOE_BUILDER_URL`` and ``MOE_BUILDER_TOKEN``, else what ``moe-builder login`` saved.
    ``Client.login(url, username, password)`` obtains a token. Resources: ``configs``, ``datasets``, ``jobs``,
    ``reports``, ``sweeps``, ``playground``. Use it as a context manager, or ``close()`` it.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0) -> None:
        saved = credentials.load()
        url = url or os.environ.get("MOE_BUILDER_URL") or saved.get("url") or ""
        token = token or os.environ.get("MOE_BUILDER_TOKEN") or (saved.get("token") if saved.get("url") == url else "")
        if not url:
            raise NotSignedIn("no server address: pass url=, set MOE_BUILDER_URL, or run `moe-builder login`")
        self.base_url = url.rstrip("/")
        self.token = token or ""
        self.timeout = timeout
        self.auth_headers = {"Authorization": f"Token {self.token}"} if self.token else {}
        self.http = httpx.Client(
            base_url=self.base_url, headers=self.auth_headers, timeout=timeout, follow_redirects=True
        )
        self.configs = Configs(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.reports = Reports(self)
        self.sweeps = Sweeps(self)
        self.playground = Playground(self)

    @classmethod
    def login(cls, url: str, username: str, password: str, *, timeout: float = 60.0) -> Client:
        """A client signed in with a token obtained for ``username`` (``POST /api/auth/token``)."""
        anonymous = cls(url, token=None, timeout=timeout)
        try:
            answer = anonymous.call("token", json={"username": username, "password": password})
        finally:
            anonymous.close()
        return cls(url, answer["token"], timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def call(
        self,
        operation: str,
        *,
        query: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
        content: bytes | None = None,
        **path: Any,
    ) -> Any:
        """Run the API operation ``operation`` and return its decoded JSON (None for an empty answer).

        ``path`` fills the path's parameters; ``query`` and ``json`` (None values left out) may hold only the
        names the operation lists, so what is sent is what the schema check covers."""
        response = self._send(operation, query, json, content, path, stream=False)
        if not response.content:
            return None
        if "json" not in response.headers.get("content-type", ""):
            return response.text
        return response.json()

    def _send(
        self,
        operation: str,
        query: dict[str, Any] | None,
        json: dict[str, Any] | None,
        content: bytes | None,
        path: dict[str, Any],
        stream: bool,
    ) -> httpx.Response:
        spec = OPERATIONS[operation]
        query = {k: v for k, v in (query or {}).items() if v is not None}
        if json is not None:
            json = {k: v for k, v in json.items() if v is not None}
        unknown = set(query) - spec.query | (set(json or {}) - spec.body)
        if unknown:
            raise TypeError(f"{operation} takes no {sorted(unknown)} (operations.OPERATIONS lists what it sends)")
        headers = {"Content-Type": BYTES} if content is not None else None
        request = self.http.build_request(
            spec.method, spec.url(**path), params=query or None, json=json, content=content, headers=headers
        )
        try:
            response = self.http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise NetworkError(f"{spec.method} {self.base_url}{request.url.path}: {exc or type(exc).__name__}") from exc
        if response.status_code >= 400:
            if stream:
                response.read()
            raise self._refusal(response)
        return response

    @staticmethod
    def _refusal(response: httpx.Response) -> ApiError:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text.strip()[:500]
        return error_for(response.status_code, body, response.headers.get("retry-after"))

    def download(self, operation: str, dest: str | Path, progress: Progress | None = None, **path: Any) -> Path:
        """Stream the answer of ``operation`` into the file ``dest`` (a folder: the server's file name in it)."""
        response = self._send(operation, None, None, None, path, stream=True)
        try:
            target = Path(dest)
            if target.is_dir():
                target = target / _filename(response, OPERATIONS[operation].url(**path))
            total = int(response.headers.get("content-length") or 0)
            done = 0
            partial = target.with_name(target.name + ".part")
            with partial.open("wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            partial.replace(target)  # a download cut short never leaves a truncated file under the real name
            return target
        except httpx.TransportError as exc:
            raise NetworkError(f"the download of {operation} failed: {exc}") from exc
        finally:
            response.close()

    def me(self) -> dict[str, Any]:
        """``{"id", "username"}`` of the token's owner."""
        result: dict[str, Any] = self.call("me")
        return result

    def schema(self) -> dict[str, Any]:
        """The server's OpenAPI schema."""
        try:
            response = self.http.get("/api/schema", params={"format": "json"})
        except httpx.TransportError as exc:
            raise NetworkError(str(exc)) from exc
        if response.status_code >= 400:
            raise self._refusal(response)
        result: dict[str, Any] = response.json()
        return result

    def compatibility_problems(self) -> builtins.list[str]:
        """How the server's API differs from what this client calls (``[]``: compatible)."""
        return check(self.schema())


def _filename(response: httpx.Response, url_path: str) -> str:
    disposition = response.headers.get("content-disposition", "")
    if "filename=" in disposition:
        return disposition.split("filename=", 1)[1].strip().strip('"').split(";")[0]
    return url_path.rstrip("/").rsplit("/", 1)[-1]


def _items(answer: Any) -> builtins.list[dict[str, Any]]:
    """A list answer (a paginated one's ``results`` too)."""
    if isinstance(answer, dict) and "results" in answer:
        return list(answer["results"])
    return list(answer or [])


def _wait(
    read: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], timeout: float | None, what: str
) -> dict[str, Any]:
    """Poll ``read`` (1 s, then up to 5 s apart) until ``done``; ``WaitTimeout`` after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.5
    while True:
        current = read()
        if done(current):
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise WaitTimeout(f"{what} did not finish within {timeout:.0f}s (last state: {current.get('state')})")
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


class Configs:
    """Templates, validation, estimates, and saved configurations with their versions."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def templates(self) -> builtins.list[dict[str, Any]]:
        return _items(self.client.call("templates"))

    def template(self, name: str) -> dict[str, Any]:
        """A template: ``title``, ``description``, ``hardware``, ``dataset`` (a built-in's slug) and its ``spec``."""
        result: dict[str, Any] = self.client.call("template", name=name)
        return result

    def validate(
        self, spec: dict[str, Any], hardware: str | None = None, num_gpus: int | None = None, raise_errors: bool = True
    ) -> dict[str, Any]:
        """``{"valid", "errors", "warnings", "spec"}`` (the spec with its defaults); an invalid spec raises
        ``SpecInvalid`` naming every field at fault (``raise_errors=False`` returns the answer instead)."""
        answer: dict[str, Any] = self.client.call(
            "validate", json={"spec": spec, "hardware": hardware, "num_gpus": num_gpus}
        )
        if raise_errors and not answer["valid"]:
            problems, _ = field_errors({"errors": answer["errors"]})
            raise SpecInvalid(200, problems, {"warnings": answer.get("warnings", [])})
        return answer

    def estimate(
        self,
        spec: dict[str, Any],
        hardware: str = "cpu",
        num_gpus: int | None = None,
        parallelism: str | None = None,
        dataset_tokens: int | None = None,
    ) -> dict[str, Any]:
        """Predicted parameters, FLOPs, memory, step and training time and out-of-memory risk on ``hardware``."""
        result: dict[str, Any] = self.client.call(
            "estimate",
            json={
                "spec": spec,
                "hardware": hardware,
                "num_gpus": num_gpus,
                "parallelism": parallelism,
                "dataset_tokens": dataset_tokens,
            },
        )
        return result

    def list(self) -> builtins.list[dict[str, Any]]:
        return _items(self.client.call("configs"))

    def get(self, config_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("config", config_id=config_id)
        return result

    def save(self, name: str, spec: dict[str, Any], description: str = "", note: str = "") -> dict[str, Any]:
        """A new configuration (its version 1); a refused spec raises ``BadRequest`` naming ``spec.<field>``."""
        result: dict[str, Any] = self.client.call(
            "config_create", json={"name": name, "spec": spec, "description": description, "note": note}
        )
        return result

    def update(self, config_id: int, **changes: Any) -> dict[str, Any]:
        """Rename or describe (``name``, ``description``); a ``spec`` (with ``note``) makes a new version."""
        result: dict[str, Any] = self.client.call("config_update", config_id=config_id, json=changes)
        return result

    def delete(self, config_id: int) -> None:
        self.client.call("config_delete", config_id=config_id)

    def versions(self, config_id: int) -> builtins.list[dict[str, Any]]:
        return _items(self.client.call("versions", config_id=config_id))

    def version(self, config_id: int, number: int | None = None) -> dict[str, Any]:
        """Version ``number`` (default: the newest) with its spec; its ``id`` is what a job launches."""
        if number is None:
            number = int(self.get(config_id)["latest_version"])
        result: dict[str, Any] = self.client.call("version", config_id=config_id, number=number)
        return result

    def add_version(self, config_id: int, spec: dict[str, Any], note: str = "") -> dict[str, Any]:
        result: dict[str, Any] = self.client.call(
            "version_create", config_id=config_id, json={"spec": spec, "note": note}
        )
        return result

    def diff(self, config_id: int, a: int, b: int) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("diff", config_id=config_id, query={"a": a, "b": b})
        return result


class Datasets:
    """Upload (chunked, resumable, with progress), list, wait for validation, delete."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def list(self) -> builtins.list[dict[str, Any]]:
        return _items(self.client.call("datasets"))

    def get(self, dataset_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("dataset", dataset_id=dataset_id)
        return result

    def find(self, name: str) -> dict[str, Any]:
        """The dataset whose slug (a built-in's, e.g. ``python-docs``) or name is ``name``."""
        for dataset in self.list():
            if name in (dataset.get("slug"), dataset.get("name")):
                return dataset
        raise NotFound(404, [FieldError("dataset", f"no dataset named {name!r} (see `datasets.list()`)")])

    def delete(self, dataset_id: int) -> None:
        self.client.call("dataset_delete", dataset_id=dataset_id)

    def upload(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        format: str | None = None,
        text_field: str | None = None,
        label_field: str | None = None,
        description: str | None = None,
        progress: Progress | None = None,
        wait: bool = True,
        timeout: float | None = 600,
    ) -> dict[str, Any]:
        """Upload the file at ``path`` in chunks of the server's size (never the whole file in memory).

        ``progress(sent, total)`` is called after each chunk. A chunk whose request failed is sent again from the
        offset the server says it has (the upload resumes; nothing is sent twice). With ``wait`` (default) the
        dataset is returned once a worker validated it; a file it refuses raises ``DatasetInvalid`` naming the
        line and the field. Without, it is returned as ``queued``."""
        path = Path(path)
        size = path.stat().st_size
        session = self.client.call(
            "upload_start",
            json={
                "filename": path.name,
                "size": size,
                "name": name,
                "description": description,
                "format": format,
                "text_field": text_field,
                "label_field": label_field,
            },
        )
        try:
            with path.open("rb") as source:
                self._send_chunks(session, source, size, progress)
            dataset: dict[str, Any] = self.client.call("upload_complete", session_id=session["id"])
        except BaseException:
            # Give the reserved quota back (best effort: the server expires abandoned uploads anyway).
            with contextlib.suppress(ClientError):
                self.client.call("upload_abort", session_id=session["id"])
            raise
        return self.wait(dataset["id"], timeout) if wait else dataset

    def resume_upload(
        self,
        session_id: str,
        path: str | Path,
        *,
        progress: Progress | None = None,
        wait: bool = True,
        timeout: float | None = 600,
    ) -> dict[str, Any]:
        """Finish an upload that stopped part-way (the process died, the network went): send the rest of the file
        at ``path`` from the byte the server has (``GET /api/datasets/uploads/<id>``), then complete it as
        ``upload`` does. The session's id is the ``id`` that ``upload_start`` answered (``DatasetInvalid``,
        ``wait`` and ``timeout`` as in ``upload``)."""
        path = Path(path)
        session = self.client.call("upload_status", session_id=session_id)
        session = {**session, "id": session_id}
        size = path.stat().st_size
        if int(session["size"]) != size:
            raise ClientError(f"{path} has {size} bytes; the upload {session_id} was started for {session['size']}")
        if not session.get("complete"):
            with path.open("rb") as source:
                self._send_chunks(session, source, size, progress)
            dataset: dict[str, Any] = self.client.call("upload_complete", session_id=session_id)
        else:
            dataset = {"id": session["dataset"]}
        return self.wait(dataset["id"], timeout) if wait else dataset

    def _send_chunks(self, session: dict[str, Any], source: BinaryIO, size: int, progress: Progress | None) -> None:
        chunk_size = int(session["chunk_size"])
        offset = int(session.get("received") or 0)
        failures = 0
        while offset < size:
            source.seek(offset)
            chunk = source.read(chunk_size)
            try:
                answer = self.client.call(
                    "upload_chunk", session_id=session["id"], query={"offset": offset}, content=chunk
                )
                offset, failures = int(answer["received"]), 0
            except (NetworkError, Conflict) as exc:
                # A lost answer or a connection cut mid-chunk: ask where the server is and go on from there.
                failures += 1
                if failures > 3:
                    raise
                if isinstance(exc, NetworkError):
                    time.sleep(0.5 * failures)
                offset = int(self.client.call("upload_status", session_id=session["id"])["received"])
            if progress is not None:
                progress(offset, size)

    def wait(self, dataset_id: int, timeout: float | None = 600) -> dict[str, Any]:
        """The dataset once validated (``ready``); ``DatasetInvalid`` (line, field, message) when refused."""
        dataset = _wait(
            lambda: self.get(dataset_id),
            lambda d: d["state"] in ("ready", "invalid", "failed"),
            timeout,
            f"dataset {dataset_id}",
        )
        if dataset["state"] != "ready":
            raise dataset_invalid(dataset)
        return dataset


class Jobs:
    """Launch, wait, cancel, resume; the metric record as a table; live points as an iterator."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def list(self) -> builtins.list[dict[str, Any]]:
        return _items(self.client.call("jobs"))

    def get(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("job", job_id=job_id)
        return result

    def launch(
        self,
        dataset: int | str | dict[str, Any],
        *,
        spec: dict[str, Any] | None = None,
        config: int | dict[str, Any] | None = None,
        version: int | None = None,
        config_version: int | None = None,
        name: str | None = None,
        queue: str | None = None,
        init_checkpoint: int | None = None,
    ) -> dict[str, Any]:
        """Queue a training job on ``dataset`` (an id, a dataset, or a name/slug) with an inline ``spec``, or a
        saved ``config`` (its newest version, or ``version``), or a ``config_version`` id; ``init_checkpoint``
        (an imported checkpoint's id) starts from its weights. Returns the job."""
        if isinstance(dataset, str):
            dataset = self.client.datasets.find(dataset)
        dataset_id = dataset["id"] if isinstance(dataset, dict) else int(dataset)
        if config is not None:
            config_id = config["id"] if isinstance(config, dict) else int(config)
            config_version = int(self.client.configs.version(config_id, version)["id"])
        result: dict[str, Any] = self.client.call(
            "job_create",
            json={
                "dataset": dataset_id,
                "spec": spec,
                "config_version": config_version,
                "name": name,
                "queue": queue,
                "init_checkpoint": init_checkpoint,
            },
        )
        return result

    def wait(self, job_id: int, timeout: float | None = None, raise_on_failure: bool = True) -> dict[str, Any]:
        """The job once it ended; ``JobFailed`` when it failed or was cancelled (unless ``raise_on_failure``)."""
        from moe_builder_client.errors import JobFailed

        job = _wait(lambda: self.get(job_id), lambda j: j["state"] in TERMINAL_JOB_STATES, timeout, f"job {job_id}")
        if raise_on_failure and job["state"] != "succeeded":
            raise JobFailed(job)
        return job

    def cancel(self, job_id: int) -> dict[str, Any]:
        """Ask a queued or running job to stop (it checkpoints within a step); 409 ``Conflict`` if it ended."""
        result: dict[str, Any] = self.client.call("job_cancel", job_id=job_id)
        return result

    def resume(self, job_id: int) -> dict[str, Any]:
        """Queue a stopped job again; it continues from its last checkpoint."""
        result: dict[str, Any] = self.client.call("job_resume", job_id=job_id)
        return result

    def points(self, job_id: int, after: int = 0) -> Iterator[Point]:
        """Every stored point after sequence number ``after``, in sequence order, fetched page by page."""
        while True:
            page = self.client.call("metrics", job_id=job_id, query={"after": after, "limit": 10000})
            for seq, step, name, value in page["points"]:
                yield Point(seq, step, name, value)
            if not page["points"]:
                return
            after = int(page["next_after"])

    def metrics(self, job_id: int, after: int = 0) -> builtins.list[dict[str, Any]]:
        """The metric record as rows ``{"seq", "step", "name", "value"}``: ``pandas.DataFrame(rows)`` takes it
        (``.pivot_table(index="step", columns="name", values="value")`` gives one column per metric)."""
        return [point._asdict() for point in self.points(job_id, after)]

    def events(self, job_id: int, after: int = 0) -> builtins.list[dict[str, Any]]:
        return list(self.client.call("events", job_id=job_id, query={"after": after})["events"])

    def watch(
        self,
        job_id: int,
        after: int = 0,
        reconnect_for: float = 60.0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> JobWatch:
        """Iterate over the job's points as they are recorded, from sequence number ``after``, until it ends;
        reconnects after a dropped connection without losing or repeating a point (``live.JobWatch``)."""
        return JobWatch(self.client, job_id, after, reconnect_for, on_event)

    def download_metrics_csv(self, job_id: int, dest: str | Path) -> Path:
        return self.client.download("metrics_csv", dest, job_id=job_id)

    def download_tensorboard(self, job_id: int, dest: str | Path) -> Path:
        return self.client.download("tensorboard", dest, job_id=job_id)


class Reports:
    """Wait for a job's evaluation report; download it (PDF, JSON, Markdown, HTML) and the model's artifacts."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def list(self, job: int | None = None, state: str | None = None) -> builtins.list[dict[str, Any]]:
        return _items(self.client.call("reports", query={"job": job, "state": state}))

    def get(self, report_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("report", report_id=report_id)
        return result

    def of_job(self, job_id: int) -> builtins.list[dict[str, Any]]:
        return _items(self.client.call("job_reports", job_id=job_id))

    def create(self, job_id: int, step: int | None = None) -> dict[str, Any]:
        """Evaluate a stopped job's last checkpoint (or the one at ``step``); asking again returns the same."""
        result: dict[str, Any] = self.client.call("report_create", job_id=job_id, json={"step": step})
        return result

    def wait(
        self, job_id: int | None = None, *, report_id: int | None = None, timeout: float | None = 900
    ) -> dict[str, Any]:
        """The report once it succeeded: ``report_id``'s, or the newest of ``job_id`` (a job that succeeds is
        evaluated on its own; this waits for that report to appear). ``ReportFailed`` when it failed."""
        if (job_id is None) == (report_id is None):
            raise TypeError("give job_id or report_id")

        def read() -> dict[str, Any]:
            if report_id is not None:
                return self.get(report_id)
            reports = self.of_job(int(job_id))  # type: ignore[arg-type]
            return max(reports, key=lambda r: r["id"]) if reports else {"state": "not started"}

        report = _wait(read, lambda r: r["state"] in ("succeeded", "failed"), timeout, "the report")
        if report["state"] == "failed":
            raise ReportFailed(report)
        return report

    def download(
        self, report_id: int, dest: str | Path = ".", format: str = "pdf", progress: Progress | None = None
    ) -> Path:
        """The report as ``pdf``, ``json``, ``md`` or ``html`` into ``dest`` (a file, or a folder)."""
        if format not in REPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(REPORT_FORMATS)}")
        return self.client.download("report_file", dest, progress, report_id=report_id, name=f"report.{format}")

    def document(self, report_id: int) -> dict[str, Any]:
        """The report's JSON document (its structure: ``GET /api/reports/schema``)."""
        response = self.client._send(
            "report_file", None, None, None, {"report_id": report_id, "name": "report.json"}, stream=False
        )
        result: dict[str, Any] = response.json()
        return result

    def artifact(self, report_id: int, name: str, dest: str | Path = ".", progress: Progress | None = None) -> Path:
        """One model artifact: ``model.safetensors``, ``tokenizer.json``, ``model.onnx``, ``spec.json``,
        ``labels.json`` (classifiers)."""
        return self.client.download("report_artifact", dest, progress, report_id=report_id, name=name)

    def huggingface(self, report_id: int, dest: str | Path, extract: bool = True) -> Path:
        """The Hugging Face export (``huggingface.zip``: config.json, model.safetensors, tokenizer) unpacked into
        ``dest``; returns the folder that ``transformers``' ``from_pretrained`` loads as the family the report
        names (``get(report_id)["huggingface"]["family"]``). ``extract=False`` keeps the zip file instead. A model
        no family can express raises ``NotFound`` naming the spec field that prevents the export."""
        export = self.get(report_id).get("huggingface") or {}
        if not export.get("family"):
            reason = export.get("reason") or "this report has no Hugging Face export"
            raise NotFound(404, [FieldError(str(export.get("field") or ""), str(reason))])
        folder = Path(dest)
        folder.mkdir(parents=True, exist_ok=True)
        archive = self.artifact(report_id, "huggingface.zip", folder / "huggingface.zip")
        if not extract:
            return archive
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(folder)  # zipfile drops absolute paths and ".." from member names
            configs = sorted((n for n in zipped.namelist() if n.rsplit("/", 1)[-1] == "config.json"), key=len)
        archive.unlink()
        # The archive holds one folder (``job-<id>/``): the one with config.json is what from_pretrained takes.
        return (folder / configs[0]).parent if configs else folder

    def artifacts(self, report_id: int, dest: str | Path) -> builtins.list[Path]:
        """Every artifact the report lists, into the folder ``dest``, each checked against its SHA-256."""
        folder = Path(dest)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        report = self.get(report_id)
        for item in report.get("downloads") or []:
            if item.get("kind") != "artifact":
                continue
            if "/artifacts/" in str(item.get("url")):
                path = self.artifact(report_id, item["name"], folder / item["name"])
            else:  # the job's TensorBoard logs, listed beside the report's artifacts
                path = self.client.jobs.download_tensorboard(int(report["job"]), folder / item["name"])
            if item.get("sha256") and _sha256(path) != item["sha256"]:
                raise ClientError(f"{path} does not match the SHA-256 the server lists for it")
            paths.append(path)
        return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Sweeps:
    """Hyperparameter sweeps: an Optuna study over spec fields around a saved configuration; each trial is a job."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def list(self) -> builtins.list[dict[str, Any]]:
        return _items(self.client.call("sweeps"))

    def get(self, sweep_id: int) -> dict[str, Any]:
        """The sweep with its ``trials`` (state, params, objective, job), ``best`` and ``importances``."""
        result: dict[str, Any] = self.client.call("sweep", sweep_id=sweep_id)
        return result

    def start(
        self,
        name: str,
        dataset: int | str | dict[str, Any],
        space: builtins.list[dict[str, Any]],
        *,
        config: int | dict[str, Any] | None = None,
        version: int | None = None,
        config_version: int | None = None,
        objective: str | None = None,
        budget: int | None = None,
        parallelism: int | None = None,
        pruner: str | None = None,
        queue: str | None = None,
        seed: int | None = None,
        first_trials: builtins.list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Start a sweep around a saved ``config`` (its newest version, or ``version``) or a ``config_version``
        id, on ``dataset``. ``space``: ``[{"path": "training.optimizer.lr", "kind": "float", "low": 1e-4,
        "high": 3e-3, "log": True}, {"path": "model.moe.top_k", "kind": "choice", "choices": [1, 2]}]``.
        A refusal names the field (``space.0.high``)."""
        if isinstance(dataset, str):
            dataset = self.client.datasets.find(dataset)
        dataset_id = dataset["id"] if isinstance(dataset, dict) else int(dataset)
        if config is not None:
            config_id = config["id"] if isinstance(config, dict) else int(config)
            config_version = int(self.client.configs.version(config_id, version)["id"])
        if config_version is None:
            raise TypeError("give config or config_version")
        result: dict[str, Any] = self.client.call(
            "sweep_create",
            json={
                "name": name,
                "config_version": config_version,
                "dataset": dataset_id,
                "space": space,
                "objective": objective,
                "budget": budget,
                "parallelism": parallelism,
                "pruner": pruner,
                "queue": queue,
                "seed": seed,
                "first_trials": first_trials,
            },
        )
        return result

    def wait(self, sweep_id: int, timeout: float | None = None) -> dict[str, Any]:
        """The sweep once it stopped running (finished, stopped or failed)."""
        return _wait(lambda: self.get(sweep_id), lambda s: not s["running"], timeout, f"sweep {sweep_id}")

    def stop(self, sweep_id: int) -> dict[str, Any]:
        """Ask for no new trial and cancel the active ones; 409 ``Conflict`` once it ended."""
        result: dict[str, Any] = self.client.call("sweep_stop", sweep_id=sweep_id)
        return result

    def save_best(self, sweep_id: int, note: str = "") -> dict[str, Any]:
        """The best completed trial's spec as a new version of the configuration (409 while none completed)."""
        result: dict[str, Any] = self.client.call("sweep_save_best", sweep_id=sweep_id, json={"note": note})
        return result

    def trials(self, sweep_id: int) -> builtins.list[dict[str, Any]]:
        """The trials as rows (``number``, ``state``, ``objective``, ``job``, and each parameter by its path):
        ``pandas.DataFrame`` takes them."""
        rows = []
        for trial in self.get(sweep_id)["trials"]:
            row = {k: v for k, v in trial.items() if k != "params"}
            row.update(trial.get("params") or {})
            rows.append(row)
        return rows
