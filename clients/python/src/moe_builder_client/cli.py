"""``moe-builder``: the platform from a terminal or a script, on top of ``moe_builder_client.Client``.

Results go to stdout as JSON (for ``jq`` and scripts); progress bars and messages go to stderr. Exit codes
(``errors.EXIT_CODES``): 0 success, 1 unexpected error, 2 wrong usage, 3 the work failed (job failed or cancelled,
dataset invalid, report failed), 4 the API refused the request, 5 not signed in or not allowed, 6 the server could
not be reached, 7 waiting took longer than --timeout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from moe_builder_client import credentials
from moe_builder_client.client import Client
from moe_builder_client.errors import EXIT_CODES, ApiError, ClientError, JobFailed, WorkFailed

err = Console(stderr=True)
# Events the progress bar already shows (state) or that say nothing a person watching needs; interventions,
# anomalies, resumes and the rest are printed above the bar.
QUIET_EVENTS = frozenset({"state", "checkpoint", "preparing", "data_ready"})
EPILOG = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + "."


def emit(data: Any) -> None:
    """A result on stdout, as JSON."""
    click.echo(json.dumps(data, indent=2, default=str))


def fail(error: ClientError) -> NoReturn:
    if isinstance(error, ApiError):
        err.print(f"[red]error:[/red] the API refused the request (HTTP {error.status}):", highlight=False)
        for problem in error.errors:
            err.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)
    else:
        err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    sys.exit(error.exit_code)


class Context:
    def __init__(self, url: str | None, token: str | None, timeout: float) -> None:
        self.url, self.token, self.timeout = url, token, timeout
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, self.token, timeout=self.timeout)
        return self._client


pass_context = click.make_pass_decorator(Context)


@click.group(epilog=EPILOG)
@click.option("--url", envvar="MOE_BUILDER_URL", help="Server address (default: the one you logged in to).")
@click.option("--token", envvar="MOE_BUILDER_TOKEN", help="API token (default: the one `login` saved).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for one HTTP answer.")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None, timeout: float) -> None:
    """The MoE Builder platform from the command line."""
    ctx.obj = Context(url, token, timeout)


@cli.command(epilog=EPILOG)
@click.option("--url", "server", default="http://127.0.0.1:8000", show_default=True, help="Server address.")
@click.option("--username", prompt=True)
@click.option("--password", prompt=True, hide_input=True, envvar="MOE_BUILDER_PASSWORD")
def login(server: str, username: str, password: str) -> None:
    """Obtain an API token and save it (mode 0600) for the next commands."""
    client = Client.login(server, username, password)
    saved = credentials.save(client.base_url, client.token, username)
    err.print(f"signed in to {client.base_url} as {username}; token saved in {saved}", highlight=False)


@cli.command(epilog=EPILOG)
@pass_context
def whoami(ctx: Context) -> None:
    """The signed-in user."""
    emit(ctx.client.me())


# --- configs ------------------------------------------------------------------------------------------------------


@cli.group(epilog=EPILOG)
def configs() -> None:
    """Templates, validation, estimates, saved configurations and their versions."""


def read_spec(path: str) -> dict[str, Any]:
    """A spec from a JSON file (``-`` for stdin); a template or config document's ``spec`` is taken from it."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} does not hold a JSON object")
    spec = data.get("spec", data)
    return spec if isinstance(spec, dict) else data


def apply_settings(spec: dict[str, Any], settings: tuple[str, ...]) -> dict[str, Any]:
    """``--set training.max_steps=20`` (the value as JSON when it parses, else a string) into ``spec``."""
    for setting in settings:
        path, sep, raw = setting.partition("=")
        if not sep or not path:
            raise click.BadParameter(f"{setting!r}: expected PATH=VALUE, e.g. training.max_steps=20")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


@configs.command("templates")
@pass_context
def configs_templates(ctx: Context) -> None:
    """The built-in templates (name, title, description)."""
    emit([{k: t.get(k) for k in ("name", "title", "description", "hardware")} for t in ctx.client.configs.templates()])


@configs.command("template")
@click.argument("name")
@pass_context
def configs_template(ctx: Context, name: str) -> None:
    """One template, with its spec (save it to a file and edit it)."""
    emit(ctx.client.configs.template(name))


@configs.command("list")
@pass_context
def configs_list(ctx: Context) -> None:
    """Your saved configurations."""
    emit([{k: c.get(k) for k in ("id", "name", "latest_version", "updated_at")} for c in ctx.client.configs.list()])


@configs.command("show")
@click.argument("config_id", type=int)
@click.option("--version", type=int, help="A version number (default: the newest).")
@pass_context
def configs_show(ctx: Context, config_id: int, version: int | None) -> None:
    """A configuration's version with its spec."""
    emit(ctx.client.configs.version(config_id, version))


@configs.command("versions")
@click.argument("config_id", type=int)
@pass_context
def configs_versions(ctx: Context, config_id: int) -> None:
    """A configuration's versions."""
    emit(ctx.client.configs.versions(config_id))


@configs.command("validate")
@click.argument("spec_file")
@click.option("--hardware", help="Check that it fits this hardware profile too (cpu, t4, a10, a100-40gb, ...).")
@pass_context
def configs_validate(ctx: Context, spec_file: str, hardware: str | None) -> None:
    """Validate a spec file; an invalid one exits 4, naming every field at fault."""
    emit(ctx.client.configs.validate(read_spec(spec_file), hardware=hardware))


@configs.command("estimate")
@click.argument("spec_file")
@click.option("--hardware", default="cpu", show_default=True)
@click.option("--gpus", "num_gpus", type=int)
@pass_context
def configs_estimate(ctx: Context, spec_file: str, hardware: str, num_gpus: int | None) -> None:
    """Predicted parameters, memory, step and training time of a spec file on a hardware profile."""
    emit(ctx.client.configs.estimate(read_spec(spec_file), hardware=hardware, num_gpus=num_gpus))


@configs.command("save")
@click.argument("spec_file")
@click.option("--name", help="Name of a new configuration.")
@click.option("--config", "config_id", type=int, help="Add a version to this configuration instead.")
@click.option("--note", default="", help="What changed (shown in the version history).")
@click.option("--set", "settings", multiple=True, metavar="PATH=VALUE", help="Change a field, e.g. training.lr=1e-3.")
@pass_context
def configs_save(
    ctx: Context, spec_file: str, name: str | None, config_id: int | None, note: str, settings: tuple[str, ...]
) -> None:
    """Save a spec file as a new configuration (--name) or a new version of one (--config)."""
    spec = apply_settings(read_spec(spec_file), settings)
    if config_id is not None:
        emit(ctx.client.configs.add_version(config_id, spec, note))
    elif name:
        emit(ctx.client.configs.save(name, spec, note=note))
    else:
        raise click.UsageError("give --name (a new configuration) or --config (a new version of one)")


# --- datasets -----------------------------------------------------------------------------------------------------


@cli.group(epilog=EPILOG)
def datasets() -> None:
    """Upload and list datasets."""


@datasets.command("list")
@pass_context
def datasets_list(ctx: Context) -> None:
    """Your datasets and the built-in ones."""
    keys = ("id", "name", "slug", "format", "state", "size_bytes")
    emit([{k: d.get(k) for k in keys} for d in ctx.client.datasets.list()])


@datasets.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "txt"]), help="Default: from the file name.")
@click.option("--text-field")
@click.option("--label-field", help="For classification: the label's field or column.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the validation.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@pass_context
def datasets_upload(
    ctx: Context,
    path: str,
    name: str | None,
    fmt: str | None,
    text_field: str | None,
    label_field: str | None,
    wait: bool,
    quiet: bool,
) -> None:
    """Upload a JSONL, CSV or TXT file in chunks (resumable), with a progress bar; an invalid file exits 3 and
    names its line and field."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=err, disable=quiet, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(f"uploading {Path(path).name}", total=Path(path).stat().st_size)
        dataset = ctx.client.datasets.upload(
            path,
            name,
            format=fmt,
            text_field=text_field,
            label_field=label_field,
            progress=lambda sent, total: bar.update(task, completed=sent),
            wait=False,
        )
    if wait:
        with err.status(f"validating dataset {dataset['id']}", spinner="dots") if not quiet else _nothing():
            dataset = ctx.client.datasets.wait(dataset["id"])
    emit(dataset)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --- jobs ---------------------------------------------------------------------------------------------------------


@cli.group(epilog=EPILOG)
def jobs() -> None:
    """Launch, watch, wait for, cancel and resume training jobs."""


@jobs.command("list")
@pass_context
def jobs_list(ctx: Context) -> None:
    """Your jobs and those shared with you."""
    keys = ("id", "name", "state", "step", "total_steps", "created_at")
    emit([{k: j.get(k) for k in keys} for j in ctx.client.jobs.list()])


@jobs.command("launch")
@click.option("--dataset", help="A dataset id, name or built-in slug (default: a template's own).")
@click.option("--spec", "spec_file", help="A spec file.")
@click.option("--config", "config_id", type=int, help="A saved configuration (its newest version, or --version).")
@click.option("--version", type=int)
@click.option("--template", help="A template's spec (see `configs templates`).")
@click.option("--set", "settings", multiple=True, metavar="PATH=VALUE", help="Change a field of --spec/--template.")
@click.option("--name")
@click.option("--queue", help="A hardware class (queue) of the platform: gpu (default), cpu, or one it defines.")
@click.option("--wait", is_flag=True, help="Watch it until it ends; exit 3 unless it succeeded.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--timeout", "wait_timeout", type=float, help="With --wait: give up after this many seconds (exit 7).")
@pass_context
def jobs_launch(
    ctx: Context,
    dataset: str | None,
    spec_file: str | None,
    config_id: int | None,
    version: int | None,
    template: str | None,
    settings: tuple[str, ...],
    name: str | None,
    queue: str | None,
    wait: bool,
    quiet: bool,
    wait_timeout: float | None,
) -> None:
    """Launch a job from a spec file, a saved configuration or a template."""
    if sum(x is not None for x in (spec_file, config_id, template)) != 1:
        raise click.UsageError("give exactly one of --spec, --config, --template")
    client = ctx.client
    spec = None
    if spec_file is not None:
        spec = apply_settings(read_spec(spec_file), settings)
        name = name or (Path(spec_file).stem if spec_file != "-" else None)  # a job with an inline spec needs one
    elif template is not None:
        chosen = client.configs.template(template)
        spec = apply_settings(chosen["spec"], settings)
        dataset = dataset or chosen.get("dataset")
        name = name or chosen.get("title")
    elif settings:
        raise click.UsageError("--set changes --spec or --template; save a new version to change a configuration")
    if not dataset:
        raise click.UsageError("give --dataset")
    target: int | str = int(dataset) if dataset.isdigit() else dataset
    job = client.jobs.launch(target, spec=spec, config=config_id, version=version, name=name, queue=queue)
    err.print(f"job {job['id']} queued", highlight=False)
    if wait:
        job = follow(client, job["id"], quiet, wait_timeout)
    emit(job)
    if job["state"] != "succeeded" and wait:
        raise JobFailed(job)


def follow(client: Client, job_id: int, quiet: bool, timeout: float | None = None) -> dict[str, Any]:
    """Show a job's live progress (state, step, loss, ETA, events) until it ends; return its final state."""
    import time

    began = time.monotonic()
    watch = client.jobs.watch(job_id)
    with Progress(
        TextColumn("[bold]job {task.fields[job]}[/bold] {task.fields[state]}"), BarColumn(), TaskProgressColumn(),
        TextColumn("step {task.fields[steps]}  loss {task.fields[loss]}"), TimeRemainingColumn(),
        console=err, disable=quiet,
    ) as bar:  # fmt: skip
        task = bar.add_task("", total=None, job=job_id, state="", loss="-", steps="-")
        seen_events = 0
        refreshed = 0.0

        def show(point: Any = None) -> None:
            nonlocal seen_events, refreshed
            if not watch.job.get("total_steps") and time.monotonic() - refreshed > 2:
                # A queued job learns its number of steps when a worker starts it; the socket's state messages
                # do not carry it.
                refreshed = time.monotonic()
                watch.job = {**watch.job, **client.jobs.get(job_id)}
            total = watch.job.get("total_steps") or None
            step = point.step if point is not None else watch.job.get("step", 0)
            fields: dict[str, Any] = {"state": watch.state, "steps": f"{step}/{total or '?'}"}
            if point is not None and point.name == "loss":
                fields["loss"] = f"{point.value:.4f}"
            bar.update(task, total=total, completed=step, **fields)
            for event in watch.events[seen_events:]:
                if event.get("kind") not in QUIET_EVENTS:
                    line = f"  step {event.get('step')}: [{event.get('kind')}] {json.dumps(event.get('data'))}"
                    bar.console.print(line, markup=False, highlight=False)
            seen_events = len(watch.events)

        for point in watch:
            show(point)
            if timeout is not None and time.monotonic() - began > timeout:
                from moe_builder_client.errors import WaitTimeout

                raise WaitTimeout(f"job {job_id} did not finish within {timeout:.0f}s")
        # The last line shows the job as it ended (its step and state as stored), not as it was when queued.
        final = client.jobs.get(job_id)
        watch.job = {**watch.job, **final}
        show()
    return final


@jobs.command("watch")
@click.argument("job_id", type=int)
@click.option("--quiet", is_flag=True, help="No progress bar: only the final state.")
@pass_context
def jobs_watch(ctx: Context, job_id: int, quiet: bool) -> None:
    """Follow a job live (progress, loss, events) until it ends; exit 3 unless it succeeded. Survives dropped
    connections (it resumes where it was)."""
    job = follow(ctx.client, job_id, quiet)
    emit(job)
    if job["state"] != "succeeded":
        raise JobFailed(job)


@jobs.command("wait")
@click.argument("job_id", type=int)
@click.option("--timeout", "wait_timeout", type=float)
@pass_context
def jobs_wait(ctx: Context, job_id: int, wait_timeout: float | None) -> None:
    """Wait (without a display) until a job ends; exit 3 unless it succeeded."""
    emit(ctx.client.jobs.wait(job_id, wait_timeout))


@jobs.command("cancel")
@click.argument("job_id", type=int)
@pass_context
def jobs_cancel(ctx: Context, job_id: int) -> None:
    """Stop a job (it keeps its checkpoint)."""
    emit(ctx.client.jobs.cancel(job_id))


@jobs.command("resume")
@click.argument("job_id", type=int)
@pass_context
def jobs_resume(ctx: Context, job_id: int) -> None:
    """Continue a stopped job from its last checkpoint."""
    emit(ctx.client.jobs.resume(job_id))


@jobs.command("metrics")
@click.argument("job_id", type=int)
@click.option("-o", "--output", help="Write the record as CSV to this file instead of JSON rows to stdout.")
@pass_context
def jobs_metrics(ctx: Context, job_id: int, output: str | None) -> None:
    """The job's metric record."""
    if output:
        err.print(f"saved {ctx.client.jobs.download_metrics_csv(job_id, output)}", highlight=False)
    else:
        emit(ctx.client.jobs.metrics(job_id))


# --- reports ------------------------------------------------------------------------------------------------------


@cli.group(epilog=EPILOG)
def reports() -> None:
    """Evaluation reports and the trained model's files."""


@reports.command("list")
@click.option("--job", type=int)
@pass_context
def reports_list(ctx: Context, job: int | None) -> None:
    emit(ctx.client.reports.list(job=job))


@reports.command("wait")
@click.argument("job_id", type=int)
@click.option("--timeout", "wait_timeout", type=float, default=900, show_default=True)
@pass_context
def reports_wait(ctx: Context, job_id: int, wait_timeout: float) -> None:
    """Wait for a job's report; exit 3 if it failed."""
    emit(ctx.client.reports.wait(job_id, timeout=wait_timeout))


@reports.command("download")
@click.argument("report_id", type=int, required=False)
@click.option("--job", type=int, help="The newest report of this job (waited for) instead of REPORT_ID.")
@click.option("--format", "fmt", type=click.Choice(["pdf", "json", "md", "html"]), default="pdf", show_default=True)
@click.option("-o", "--output", default=".", show_default=True, help="A file, or a folder.")
@click.option("--artifacts", "artifacts_dir", help="Also download every model artifact into this folder.")
@click.option("--huggingface", "hf_dir", help="Also unpack the Hugging Face export (from_pretrained) into this folder.")
@pass_context
def reports_download(
    ctx: Context,
    report_id: int | None,
    job: int | None,
    fmt: str,
    output: str,
    artifacts_dir: str | None,
    hf_dir: str | None,
) -> None:
    """Download a report (PDF by default), and optionally the weights, tokenizer and ONNX model, and the Hugging
    Face folder."""
    if (report_id is None) == (job is None):
        raise click.UsageError("give REPORT_ID or --job")
    client = ctx.client
    if report_id is None:
        report_id = int(client.reports.wait(job)["id"])
    saved = [str(client.reports.download(report_id, output, fmt, progress=_bytes_progress(f"report.{fmt}")))]
    if artifacts_dir:
        saved += [str(p) for p in client.reports.artifacts(report_id, artifacts_dir)]
    if hf_dir:
        saved.append(str(client.reports.huggingface(report_id, hf_dir)))
    emit({"report": report_id, "files": saved})


def _bytes_progress(what: str) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if total:
            err.print(f"\r{what}: {done}/{total} bytes", end="", highlight=False)
            if done >= total:
                err.print("", highlight=False)

    return show


# --- sweeps -------------------------------------------------------------------------------------------------------


@cli.group(epilog=EPILOG)
def sweeps() -> None:
    """Hyperparameter sweeps over spec fields around a saved configuration."""


def read_space(space: str) -> list[dict[str, Any]]:
    """A search space: a JSON list inline, or a file holding one (``-`` for stdin)."""
    text = space if space.lstrip().startswith("[") else (sys.stdin.read() if space == "-" else Path(space).read_text())
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"the space is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise click.BadParameter("the space is a JSON list of {path, kind, ...}")
    return data


@sweeps.command("start")
@click.option("--name", required=True)
@click.option("--config", "config_id", type=int, required=True, help="The configuration to search around.")
@click.option("--version", type=int, help="Its version (default: the newest).")
@click.option("--dataset", required=True, help="A dataset id, name or built-in slug.")
@click.option(
    "--space",
    required=True,
    help='JSON list or file: [{"path": "training.optimizer.lr", "kind": "float", "low": 1e-4, "high": 3e-3, '
    '"log": true}, {"path": "model.moe.top_k", "kind": "choice", "choices": [1, 2]}]',
)
@click.option("--objective", type=click.Choice(["val_loss", "val_accuracy"]))
@click.option("--budget", type=int, help="Trials in all.")
@click.option("--parallelism", type=int, help="Trials training at once.")
@click.option("--pruner", type=click.Choice(["median", "halving"]))
@click.option("--queue")
@click.option("--seed", type=int)
@click.option("--wait", is_flag=True, help="Wait until it ends (trials as they finish on stderr).")
@pass_context
def sweeps_start(
    ctx: Context,
    name: str,
    config_id: int,
    version: int | None,
    dataset: str,
    space: str,
    objective: str | None,
    budget: int | None,
    parallelism: int | None,
    pruner: str | None,
    queue: str | None,
    seed: int | None,
    wait: bool,
) -> None:
    """Start a sweep; a refused space names its field (space.0.high)."""
    client = ctx.client
    target: int | str = int(dataset) if dataset.isdigit() else dataset
    sweep = client.sweeps.start(
        name, target, read_space(space), config=config_id, version=version, objective=objective, budget=budget,
        parallelism=parallelism, pruner=pruner, queue=queue, seed=seed,
    )  # fmt: skip
    err.print(f"sweep {sweep['id']} started", highlight=False)
    if wait:
        sweep = follow_sweep(client, sweep["id"])
    emit(sweep)
    if sweep["state"] == "failed":
        raise WorkFailed(f"sweep {sweep['id']} failed: {sweep.get('error') or 'no reason given'}")


def follow_sweep(client: Client, sweep_id: int) -> dict[str, Any]:
    """Poll a sweep until it stops running, printing each trial once it ends; return the sweep."""
    import time

    told: set[int] = set()
    while True:
        sweep = client.sweeps.get(sweep_id)
        for trial in sweep["trials"]:
            if trial["state"] not in ("pending", "running", "waiting") and trial["number"] not in told:
                told.add(trial["number"])
                err.print(
                    f"trial {trial['number']} {trial['state']}: objective {trial['objective']} {trial['params']}"
                    + (f" ({trial['reason']})" if trial.get("reason") else ""),
                    markup=False,
                    highlight=False,
                )
        if not sweep["running"]:
            return sweep
        time.sleep(2)


@sweeps.command("list")
@pass_context
def sweeps_list(ctx: Context) -> None:
    keys = ("id", "name", "state", "budget", "counts", "best")
    emit([{k: s.get(k) for k in keys} for s in ctx.client.sweeps.list()])


@sweeps.command("show")
@click.argument("sweep_id", type=int)
@pass_context
def sweeps_show(ctx: Context, sweep_id: int) -> None:
    """A sweep: its trials, best trial and parameter importances."""
    emit(ctx.client.sweeps.get(sweep_id))


@sweeps.command("wait")
@click.argument("sweep_id", type=int)
@pass_context
def sweeps_wait(ctx: Context, sweep_id: int) -> None:
    """Wait until a sweep ends; exit 3 if it failed."""
    sweep = follow_sweep(ctx.client, sweep_id)
    emit(sweep)
    if sweep["state"] == "failed":
        raise WorkFailed(f"sweep {sweep_id} failed: {sweep.get('error') or 'no reason given'}")


@sweeps.command("stop")
@click.argument("sweep_id", type=int)
@pass_context
def sweeps_stop(ctx: Context, sweep_id: int) -> None:
    """Ask for no new trial and cancel the active ones."""
    emit(ctx.client.sweeps.stop(sweep_id))


@sweeps.command("save-best")
@click.argument("sweep_id", type=int)
@click.option("--note", default="")
@pass_context
def sweeps_save_best(ctx: Context, sweep_id: int, note: str) -> None:
    """Save the best trial's spec as a new version of the configuration."""
    emit(ctx.client.sweeps.save_best(sweep_id, note))


@cli.command(epilog=EPILOG)
@click.argument("job_id", type=int)
@click.argument("prompt")
@click.option("--report", type=int, help="The checkpoint of this report (default: the job's latest).")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--seed", type=int)
@pass_context
def playground(
    ctx: Context, job_id: int, prompt: str, report: int | None, max_tokens: int, temperature: float, seed: int | None
) -> None:
    """Generate text from a trained job's model, printed as it is produced; why it ended goes to stderr."""
    with ctx.client.playground.session(job_id, report) as session:
        for piece in session.stream(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed):
            click.echo(piece, nl=False)
        click.echo()
        done = session.last_done or {}
    ended = {"eos": "the model ended the text", "max_tokens": "max tokens reached"}.get(str(done.get("stopped")), "")
    count = done.get("tokens", 0)
    summary = f"{count} {'piece' if count == 1 else 'pieces'} in {done.get('seconds', 0)} s"
    err.print(summary + (f": {ended}" if ended else ""))


def main() -> None:
    """The entry point: runs the command; a ``ClientError`` exits with its code (see ``EXIT_CODES``)."""
    try:
        cli.main(standalone_mode=False, prog_name="moe-builder")
    except ClientError as error:
        fail(error)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(1)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
