"""The Python client and the ``moe-builder`` command line against the real server (uvicorn), Redis and a Celery
worker, signed in with an API token from ``/api/auth/token``.

The session's stack provides Redis and the worker; this module runs an ASGI server of its own on a fixed port (the
same settings), so that one test can kill it in the middle of a watch and start it again where the client reconnects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moe_builder_client import BadRequest, Client, Conflict, DatasetInvalid, JobFailed, Point, SpecInvalid

from tests.builder.test_jobs import CORPUS
from tests.services import UVICORN_OPTIONS, VENV_BIN, Service, Stack, free_port, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

MOE_BUILDER = str(VENV_BIN / "moe-builder")
# Uploads in chunks of the server's smallest allowed size, so a small file takes several.
CHUNK = 64 * 1024


class WebServer:
    """uvicorn on one port, restartable there (a client reconnects to the same address)."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "DATASET_UPLOAD_CHUNK_BYTES": str(CHUNK)}
        self.logdir = logdir
        self.service: Service | None = None

    def start(self) -> None:
        argv = [
            str(VENV_BIN / "uvicorn"), *UVICORN_OPTIONS, "--host", "127.0.0.1", "--port", str(self.port),
            "builder.asgi:application",
        ]  # fmt: skip
        self.service = Service("asgi", argv, self.env, self.logdir / "client-asgi.log").start()
        service = self.service

        def up() -> bool:
            assert service.alive(), service.log_tail()
            import httpx

            return httpx.get(f"{self.url}/accounts/login/", timeout=2).status_code == 200

        wait_for(up, 30, "the ASGI server")

    def kill(self) -> None:
        """Gone at once, as in a crash: every open socket is cut without a closing handshake."""
        assert self.service is not None
        self.service.stop(sig=signal.SIGKILL)


@pytest.fixture(scope="module")
def web(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    server = WebServer(stack.env, tmp_path_factory.mktemp("client-web"))
    server.start()
    try:
        yield server
    finally:
        if server.service is not None:
            server.service.stop()


def token_for(web: WebServer, user: Any) -> str:
    """An API token the way a script gets one: ``POST /api/auth/token`` with the password."""
    client = Client.login(web.url, user.get_username(), user.raw_password)
    client.close()
    return client.token


def tiny(spec: dict[str, Any], max_steps: int) -> dict[str, Any]:
    """A template's spec cut down to seconds on this CPU (byte tokens, two narrow layers) for the tests."""
    spec = json.loads(json.dumps(spec))
    spec["model"].update({"vocab_size": 260, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32})
    # Sigmoid router scores: the Hugging Face export then has a family (GLM-4-MoE) that expresses the model.
    spec["model"]["moe"].update({"num_routed_experts": 4, "top_k": 2, "expert_hidden_size": 32, "scoring": "sigmoid"})
    spec["training"].update(
        {"batch_size": 4, "max_steps": max_steps, "log_interval": 1, "eval_interval": 10, "eval_batches": 2,
         "checkpoint_interval": 10}
    )  # fmt: skip
    spec["training"]["schedule"]["warmup_steps"] = 2
    spec["data"].update({"tokenizer": "bytes", "seq_len": 32, "val_fraction": 0.1})
    return spec


def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join([CORPUS] * 4))  # ~85 KB: two chunks
    return path


def cli(
    web: WebServer, token: str, *args: str, home: Path, terminal: bool = False, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``moe-builder`` in a subprocess; ``terminal``: rich draws its live display as on a terminal."""
    env = {**os.environ, "MOE_BUILDER_URL": web.url, "MOE_BUILDER_TOKEN": token, "MOE_BUILDER_CONFIG": str(home)}
    if terminal:
        env.update({"TTY_COMPATIBLE": "1", "COLUMNS": "120", "NO_COLOR": "1"})
    return subprocess.run([MOE_BUILDER, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_from_a_template_to_a_downloaded_report(web: WebServer, alice: Any, tmp_path: Path) -> None:
    client = Client(web.url, token_for(web, alice))
    assert client.compatibility_problems() == []  # the live server's /api/schema

    template = client.configs.template("tiny-cpu-demo")
    spec = tiny(template["spec"], max_steps=30)
    assert client.configs.validate(spec)["valid"]
    assert client.configs.estimate(spec, hardware="cpu")["estimate"]
    config = client.configs.save("from the tiny template", spec)
    spec["training"]["optimizer"]["lr"] = 0.003
    second = client.configs.add_version(config["id"], spec, note="lr 3e-3")
    assert sorted(v["number"] for v in client.configs.versions(config["id"])) == [1, 2]
    assert client.configs.version(config["id"])["id"] == second["id"]

    sent: list[tuple[int, int]] = []
    dataset = client.datasets.upload(corpus_file(tmp_path), "corpus", progress=lambda s, t: sent.append((s, t)))
    assert dataset["state"] == "ready"
    assert [s for s, _ in sent] == [CHUNK, sent[-1][1]] and sent[-1][0] == sent[-1][1]  # two chunks, then all

    job = client.jobs.launch(dataset, config=config)  # its newest version
    watch = client.jobs.watch(job["id"])
    points = list(watch)
    assert watch.state == "succeeded"
    finished = client.jobs.wait(job["id"])
    assert finished["step"] == 30
    record = client.jobs.metrics(job["id"])
    # The live iterator gave exactly the stored record: every point once, in sequence order.
    assert [p._asdict() for p in points] == record
    assert {r["step"] for r in record if r["name"] == "loss"} == set(range(1, 31))

    report = client.reports.wait(job["id"], timeout=300)
    pdf = client.reports.download(report["id"], tmp_path, "pdf")
    assert pdf.read_bytes().startswith(b"%PDF")
    document = client.reports.document(report["id"])
    assert document["checkpoint"]["step"] == 30
    timings = document["report"].get("timings")
    print(f"\njob {finished['started_at']} → {finished['finished_at']}; report timings {timings}")
    artifacts = {p.name for p in client.reports.artifacts(report["id"], tmp_path / "artifacts")}  # SHA-256 checked
    assert {"model.safetensors", "tokenizer.json", "spec.json", f"job-{job['id']}-tensorboard.tar.gz"} <= artifacts
    family = client.reports.get(report["id"])["huggingface"]["family"]
    folder = client.reports.huggingface(report["id"], tmp_path / "hf")  # what from_pretrained loads
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    assert (folder / "model.safetensors").stat().st_size > 0
    # Greedy: sampled, a barely trained model can end the text at once (an empty text, which is not a failure).
    text = client.playground.generate(job["id"], "the expert", report=report["id"], max_tokens=8, temperature=0)
    assert isinstance(text, str) and text
    with client.playground.session(job["id"], report["id"]) as session:
        pieces = list(session.stream("the expert", max_tokens=8, temperature=0))
        assert "".join(pieces) == text  # greedy: the same text again
        done = session.last_done
        assert done is not None and done["tokens"] == len(pieces) and done["stopped"] in ("eos", "max_tokens")

    # The same from the command line: watching a finished job, downloading its report.
    home = tmp_path / "cli.json"
    watched = cli(web, client.token, "jobs", "watch", str(job["id"]), home=home, terminal=True)
    assert watched.returncode == 0 and json.loads(watched.stdout)["state"] == "succeeded", watched.stderr
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", watched.stderr)  # the live display, without terminal codes
    assert f"job {job['id']} succeeded" in drawn and "step 30/30" in drawn, drawn
    # Launching and following a job from the queue: the last line drawn is the job as it ended.
    spec_file = tmp_path / "five.json"
    spec_file.write_text(json.dumps(tiny(template["spec"], max_steps=5)))
    followed = cli(web, client.token, "jobs", "launch", "--spec", str(spec_file), "--dataset", str(dataset["id"]),
                   "--wait", home=home)  # fmt: skip
    assert followed.returncode == 0 and json.loads(followed.stdout)["step"] == 5, followed.stderr
    last = followed.stderr.strip().splitlines()[-1]
    assert "succeeded" in last and "step 5/5" in last, followed.stderr
    out = tmp_path / "from-cli.pdf"
    downloaded = cli(web, client.token, "reports", "download", "--job", str(job["id"]), "-o", str(out), home=home)
    assert downloaded.returncode == 0, downloaded.stderr
    assert out.read_bytes() == pdf.read_bytes()
    spoken = cli(web, client.token, "playground", str(job["id"]), "the expert", "--max-tokens", "8", "--temperature",
                 "0", home=home)  # fmt: skip
    assert spoken.returncode == 0 and spoken.stdout == text + "\n", spoken.stderr
    ending = "the model ended the text" if done["stopped"] == "eos" else "max tokens reached"
    counted = f"{len(pieces)} {'piece' if len(pieces) == 1 else 'pieces'} in"
    assert counted in spoken.stderr and ending in spoken.stderr, spoken.stderr


def test_an_invalid_file_raises_naming_its_line_and_field(web: WebServer, alice: Any, tmp_path: Path) -> None:
    client = Client(web.url, token_for(web, alice))
    bad = tmp_path / "reviews.jsonl"
    bad.write_text('{"text": "fine", "stars": 5}\n{"text": "fine too", "stars": 4}\n{"body": "no text", "stars": 1}\n')
    with pytest.raises(DatasetInvalid) as invalid:
        client.datasets.upload(bad, "reviews", text_field="text", label_field="stars")
    assert invalid.value.line == 3 and invalid.value.field == "text", str(invalid.value)
    assert "line 3" in str(invalid.value)

    # The command line says the same and exits 3 (the work failed).
    result = cli(web, client.token, "datasets", "upload", str(bad), "--text-field", "text", "--quiet", home=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "line 3" in result.stderr and "'text'" in result.stderr


def test_an_upload_cut_short_resumes_from_the_byte_the_server_has(web: WebServer, alice: Any, tmp_path: Path) -> None:
    client = Client(web.url, token_for(web, alice))
    path = corpus_file(tmp_path)
    data = path.read_bytes()
    # A first process sent one chunk and died.
    session = client.call("upload_start", json={"filename": path.name, "size": len(data), "name": "resumed"})
    client.call("upload_chunk", session_id=session["id"], query={"offset": 0}, content=data[:CHUNK])
    sent: list[int] = []
    dataset = client.datasets.resume_upload(session["id"], path, progress=lambda s, t: sent.append(s))
    assert sent == [len(data)]  # only the rest went: one chunk, from byte CHUNK
    assert dataset["state"] == "ready" and dataset["size_bytes"] == len(data)
    assert dataset["sha256"] == hashlib.sha256(data).hexdigest()  # the bytes stored are the file's


def test_refusals_are_typed_and_exit_codes_tell_them_apart(web: WebServer, alice: Any, tmp_path: Path) -> None:
    client = Client(web.url, token_for(web, alice))
    spec = tiny(client.configs.template("tiny-cpu-demo")["spec"], max_steps=5)
    spec["model"]["moe"]["top_k"] = 9  # more experts per token than there are
    with pytest.raises(SpecInvalid) as invalid:
        client.configs.validate(spec)
    assert "model.moe.top_k" in invalid.value.fields
    with pytest.raises(BadRequest) as refused:
        client.configs.save("too many", spec)
    assert any(path.startswith("spec.model.moe") for path in refused.value.fields), refused.value.errors

    home = tmp_path / "credentials.json"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    assert cli(web, client.token, "whoami", home=home).returncode == 0
    launched = cli(web, client.token, "jobs", "launch", "--spec", str(spec_file), "--dataset", "999999", home=home)
    assert launched.returncode == 4 and "spec.model.moe" in launched.stderr, launched.stderr
    missing = cli(web, client.token, "jobs", "launch", "--spec", str(spec_file), "--dataset", "no-such", home=home)
    assert missing.returncode == 4 and "no dataset named 'no-such'" in missing.stderr, missing.stderr
    assert cli(web, "not-a-token", "whoami", home=home).returncode == 5
    nowhere = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    unreachable = subprocess.run(
        [MOE_BUILDER, "--url", nowhere, "--token", "x", "whoami"], capture_output=True, text=True, timeout=60
    )
    assert unreachable.returncode == 6, unreachable.stderr
    assert cli(web, client.token, "jobs", "launch", home=home).returncode == 2  # usage: nothing to launch

    # login saves the token (0600); the next command needs no token of its own.
    env = {**os.environ, "MOE_BUILDER_CONFIG": str(home), "MOE_BUILDER_PASSWORD": alice.raw_password}
    env.pop("MOE_BUILDER_TOKEN", None)
    env.pop("MOE_BUILDER_URL", None)
    login = subprocess.run(
        [MOE_BUILDER, "login", "--url", web.url, "--username", "alice"], env=env, capture_output=True, text=True
    )
    assert login.returncode == 0, login.stderr
    assert home.stat().st_mode & 0o777 == 0o600
    me = subprocess.run([MOE_BUILDER, "whoami"], env=env, capture_output=True, text=True, timeout=60)
    assert me.returncode == 0 and json.loads(me.stdout)["username"] == "alice", me.stderr
    env["MOE_BUILDER_PASSWORD"] = "wrong"
    refused_login = subprocess.run(
        [MOE_BUILDER, "login", "--url", web.url, "--username", "alice"], env=env, capture_output=True, text=True
    )
    # A wrong password is answered 401: the auth exit code, with the server's reason.
    assert refused_login.returncode == 5 and "Unable to log in" in refused_login.stderr, refused_login.stderr


def test_a_watch_survives_the_web_server_dying_without_losing_or_repeating_a_point(
    web: WebServer, alice: Any, tmp_path: Path
) -> None:
    client = Client(web.url, token_for(web, alice), timeout=10)
    dataset = client.datasets.upload(corpus_file(tmp_path), "corpus")
    spec = tiny(client.configs.template("tiny-cpu-demo")["spec"], max_steps=100000)
    # A job that must run until the test cancels it: on an idle machine the tiny model overfits its small corpus in
    # a few hundred steps and the anomaly guard, after its rollbacks, would end the job by itself (seen: a loss spike
    # at step 251, "max_rollbacks (3) reached") before the watch is done. Plateau interventions likewise stay off.
    spec["training"]["anomaly"] = {"enabled": False}
    spec["training"]["plateau"] = {"enabled": False}
    job = client.jobs.launch(dataset, spec=spec, name="long")
    watch = client.jobs.watch(job["id"], reconnect_for=60)
    points: list[Point] = []
    restarted_at: int | None = None
    cancel_sent = threading.Event()
    for point in watch:
        points.append(point)
        if restarted_at is None and point.name == "loss" and point.step >= 10:
            web.kill()  # mid-stream: the worker keeps training and storing points while no web server runs
            time.sleep(2)
            web.start()
            restarted_at = point.step
        late = restarted_at is not None and point.name == "loss" and point.step >= restarted_at + 10
        if late and not cancel_sent.is_set():
            client.jobs.cancel(job["id"])
            cancel_sent.set()
    assert watch.reconnects >= 1 and watch.state == "cancelled"
    record = [Point(**row) for row in client.jobs.metrics(job["id"])]
    seqs = [p.seq for p in points]
    assert seqs == sorted(set(seqs)), "a point came twice or out of order"
    assert points == record, "the watch's points differ from the stored record"
    loss_steps = [p.step for p in points if p.name == "loss"]
    assert loss_steps == list(range(1, loss_steps[-1] + 1))  # no step missing across the restart

    # Cancelling it again is a conflict; resuming continues from its checkpoint (then it is cancelled again).
    with pytest.raises(Conflict) as conflict:
        client.jobs.cancel(job["id"])
    assert conflict.value.status == 409
    assert client.jobs.resume(job["id"])["state"] in ("queued", "running")
    client.jobs.cancel(job["id"])
    # A job that ended cancelled: `jobs watch` and `jobs wait` exit 3; the client raises JobFailed.
    with pytest.raises(JobFailed):
        client.jobs.wait(job["id"], timeout=120)
    home = tmp_path / "cli.json"
    assert cli(web, client.token, "jobs", "watch", str(job["id"]), "--quiet", home=home).returncode == 3
    assert cli(web, client.token, "jobs", "wait", str(job["id"]), home=home).returncode == 3


def test_a_sweep_from_the_client_saves_its_best_trial(web: WebServer, alice: Any, tmp_path: Path) -> None:
    client = Client(web.url, token_for(web, alice))
    dataset = client.datasets.upload(corpus_file(tmp_path), "corpus")
    config = client.configs.save("to tune", tiny(client.configs.template("tiny-cpu-demo")["spec"], max_steps=10))
    space = [{"path": "training.optimizer.lr", "kind": "float", "low": 1e-4, "high": 3e-3, "log": True}]

    # A refused space names its field, from Python and from the command line (exit 4).
    with pytest.raises(BadRequest) as refused:
        client.sweeps.start("bad", dataset, [{**space[0], "high": 3.0}], config=config)
    assert "space.0.high" in refused.value.fields, refused.value.errors
    home = tmp_path / "cli.json"
    bad = json.dumps([{**space[0], "high": 3.0}])
    started = cli(web, client.token, "sweeps", "start", "--name", "bad", "--config", str(config["id"]), "--dataset",
                  str(dataset["id"]), "--space", bad, home=home)  # fmt: skip
    assert started.returncode == 4 and "space.0.high" in started.stderr, started.stderr

    sweep = client.sweeps.start("tune lr", dataset, space, config=config, budget=2, parallelism=2, seed=1)
    finished = client.sweeps.wait(sweep["id"], timeout=400)
    assert finished["state"] == "finished", finished
    trials = client.sweeps.trials(sweep["id"])  # rows: one column per parameter
    assert len(trials) == 2 and all("training.optimizer.lr" in row for row in trials)
    assert all(row["job"] for row in trials)
    saved = client.sweeps.save_best(sweep["id"], note="best lr")
    assert saved["number"] == 2 and client.configs.version(config["id"])["id"] == saved["id"]
    with pytest.raises(Conflict):
        client.sweeps.stop(sweep["id"])  # it already ended
    shown = cli(web, client.token, "sweeps", "show", str(sweep["id"]), home=home)
    assert shown.returncode == 0 and json.loads(shown.stdout)["best"]["number"] in (0, 1), shown.stderr
