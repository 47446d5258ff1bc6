"""The production deployment in platform/: the compose file, the Kubernetes manifests and the image, checked with
their own tools offline (nothing is built or pulled: that needs a registry).

- compose: ``docker compose config`` (the Docker CLI's plugin) or, where the plugin is missing, Debian's
  ``docker-compose`` (``.ci/run`` installs it): both parse the file against the Compose schema and interpolate it.
- Kubernetes: ``kubectl kustomize`` renders the manifests (kubectl's ``apply --dry-run=client`` needs a cluster to
  map kinds, so it cannot run offline), and ``kubernetes-validate`` checks every object against the Kubernetes API's
  own OpenAPI schemas, strictly (an unknown or misspelt field fails). KEDA's ScaledObject has no schema there: its
  references are checked against the other manifests and the app instead.
- Every setting the files give the app is one that builder/settings.py (or the image's entry point) reads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.services import ROOT

PLATFORM = ROOT / "platform"
COMPOSE = PLATFORM / "compose.yaml"
K8S = PLATFORM / "k8s"
# The secrets compose requires (``${VAR:?...}``), with throwaway values for ``config``.
REQUIRED = {"SECRET_KEY": "s", "POSTGRES_PASSWORD": "p", "MINIO_ROOT_PASSWORD": "m", "ADMIN_PASSWORD": "a"}
APP_SERVICES = {"init", "web", "worker-gpu", "worker-cpu", "beat"}
APP_COMPONENTS = {"web", "worker-gpu", "worker-cpu", "beat", "migrate"}


def _compose_command() -> list[str] | None:
    """The Docker CLI's compose plugin when it works here (it needs no daemon for ``config``), else Debian's
    ``docker-compose``; None when neither is installed."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _compose_config(env: dict[str, str], env_file: Path) -> subprocess.CompletedProcess[str]:
    command = _compose_command()
    if command is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed (.ci/run installs the latter)")
    # Only the variables given here: a developer's SECRET_KEY or platform/.env must not make the check pass.
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    env_file.write_text("")
    return subprocess.run(
        [*command, "--project-directory", str(PLATFORM), "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=clean,
        check=False,
        timeout=120,
    )


def settings_the_app_reads() -> set[str]:
    """Every variable builder/settings.py reads through its typed helpers, those the image's entry point reads,
    and those that libraries read for it (boto3's credentials, Django's createsuperuser)."""
    settings_source = (ROOT / "builder" / "settings.py").read_text()
    names = set(re.findall(r"\benv_\w+\(\s*\"([A-Z][A-Z0-9_]*)\"", settings_source))
    names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (PLATFORM / "entrypoint.sh").read_text()))
    names |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "DJANGO_SUPERUSER_EMAIL"}
    return names


def test_the_compose_file_is_valid_and_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    env_file = tmp_path / "empty.env"
    answer = _compose_config(REQUIRED, env_file)
    assert answer.returncode == 0, answer.stderr
    config = yaml.safe_load(answer.stdout)
    services = config["services"]
    assert set(services) == APP_SERVICES | {"redis", "postgres", "minio", "minio-bucket"}
    # The GPU worker reserves an NVIDIA GPU and runs the CUDA image; the others the CPU one.
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["worker-gpu"]["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert {services[s]["build"]["args"]["TORCH_VARIANT"] for s in APP_SERVICES - {"worker-gpu"}} == {"cpu"}
    # Every app service waits for the init service (migrations, the first administrator), which waits for the
    # database, Redis and the bucket.
    for name in APP_SERVICES - {"init"}:
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully", name
    assert set(services["init"]["depends_on"]) == {"postgres", "redis", "minio-bucket"}
    readable = settings_the_app_reads()
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert set(env) <= readable, f"{name}: {sorted(set(env) - readable)} are read by nothing"
        assert env["DATABASE_URL"].startswith("postgres://") and env["S3_BUCKET"] and env["REDIS_URL"]
    assert services["init"]["environment"]["DJANGO_SUPERUSER_PASSWORD"] == REQUIRED["ADMIN_PASSWORD"]
    # Each secret is required: without it compose stops and names it.
    for name in REQUIRED:
        missing = _compose_config({k: v for k, v in REQUIRED.items() if k != name}, env_file)
        assert missing.returncode != 0 and name in missing.stderr, (name, missing.stderr)


def _manifests() -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k platform/k8s`` would send: rendered by kubectl's kustomize when kubectl is
    here, else the files the kustomization lists (the namespace and labels then unapplied)."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        rendered = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=False, timeout=120
        )
        assert rendered.returncode == 0, rendered.stderr
        return [d for d in yaml.safe_load_all(rendered.stdout) if d]
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return [d for name in listed for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list(obj["spec"]["template"]["spec"]["containers"])


def _component(obj: dict[str, Any]) -> str:
    return str(obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def test_the_kubernetes_manifests_render_and_match_the_api_schemas() -> None:
    import kubernetes_validate

    objects = _manifests()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
        if obj["kind"] == "ScaledObject":
            continue  # a KEDA resource: no schema in the Kubernetes API's (checked below)
        # Strict: a field the API does not know (a typo, a wrong level) fails, as the API server would refuse it.
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    if shutil.which("kubectl"):
        assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"moe-builder"}

    deployments = by_kind["Deployment"]
    job = by_kind["Job"]["moe-builder-migrate"]
    components = {_component(o) for o in [*deployments.values(), job]}
    assert components == APP_COMPONENTS
    # The GPU worker asks for a GPU (requests and limits, as an extended resource must) and runs the CUDA image.
    gpu = deployments["moe-builder-worker-gpu"]
    (worker,) = _containers(gpu)
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["image"].endswith(":cuda") and worker["args"] == ["worker"]
    # Beat runs once, and a rollout never runs two.
    beat = deployments["moe-builder-beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    # The web tier: a Service selects the web pods, the Ingress routes to that Service's port.
    web = deployments["moe-builder-web"]
    service = by_kind["Service"]["moe-builder-web"]
    assert service["spec"]["selector"].items() <= web["spec"]["template"]["metadata"]["labels"].items()
    backend = by_kind["Ingress"]["moe-builder"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    # Settings come from the ConfigMap and, secrets, from a Secret that is never in the manifests; both are read.
    config = by_kind["ConfigMap"]["moe-builder"]["data"]
    readable = settings_the_app_reads()
    assert set(config) <= readable, sorted(set(config) - readable)
    assert "Secret" not in by_kind
    for obj in [*deployments.values(), job]:
        for container in _containers(obj):
            sources = {next(iter(s)) + ":" + next(iter(s.values()))["name"] for s in container["envFrom"]}
            assert sources == {"configMapRef:moe-builder", "secretRef:moe-builder"}, obj["metadata"]["name"]
            assert {e["name"] for e in container.get("env", [])} <= readable


def test_the_autoscaling_example_follows_the_gpu_queue_and_the_jobs_it_holds() -> None:
    from builder.jobs.models import ACTIVE_STATES, Job

    objects = _manifests()
    (scaled,) = [o for o in objects if o["kind"] == "ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target_name = scaled["spec"]["scaleTargetRef"]["name"]
    target = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == target_name)
    (worker,) = _containers(target)
    queues = next(e["value"] for e in worker["env"] if e["name"] == "WORKER_QUEUES").split(",")
    triggers = {t["type"]: t["metadata"] for t in scaled["spec"]["triggers"]}
    # Celery's Redis transport keeps a queue as a list named after it: the list the target worker consumes.
    assert triggers["redis"]["listName"] in queues
    assert int(triggers["redis"]["listLength"]) >= 1
    # The database trigger counts the target's active jobs in the jobs table, by the states the app calls active.
    query = triggers["postgresql"]["query"]
    assert f"FROM {Job._meta.db_table} " in query and f"queue = '{triggers['redis']['listName']}'" in query
    assert set(re.findall(r"'(\w+)'", query.split("state IN", 1)[1])) == {str(s) for s in ACTIVE_STATES}
    assert triggers["postgresql"]["connectionFromEnv"] in settings_the_app_reads()
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_the_image_builds_from_files_that_exist_with_a_cpu_or_cuda_torch() -> None:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(PLATFORM / "Dockerfile"))
    stages: list[str] = []
    for instruction in parser.structure:
        kind, value = instruction["instruction"], instruction["value"]
        if kind == "FROM":
            stages.append(value.split()[-1])
        elif kind in {"COPY", "ADD"}:
            words = value.split()
            source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            paths = [w for w in words if not w.startswith("--")][:-1]
            if source_stage is not None:
                assert source_stage in stages, f"COPY --from={source_stage}: no earlier stage of that name"
            else:
                for path in paths:
                    assert (ROOT / path).exists(), f"{kind} {path}: not in the repository"
                    assert not _docker_ignored(path), f"{kind} {path}: excluded by .dockerignore"
    assert stages == ["frontend", "python", "runtime"]
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    torch_step = next(step for step in runs if "TORCH_VARIANT" in step)
    assert "cpu)" in torch_step and "cuda)" in torch_step
    # The torch the image installs is the one the project pins.
    pinned = next(d for d in _project_dependencies() if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={pinned.removeprefix('torch==')}" in (PLATFORM / "Dockerfile").read_text()
    assert os.access(PLATFORM / "entrypoint.sh", os.X_OK)


def _project_dependencies() -> list[str]:
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def _docker_ignored(path: str) -> bool:
    import fnmatch

    ignore = ROOT / ".dockerignore"
    if not ignore.exists():
        return False
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    ignored = False
    for pattern in patterns:  # later lines win; "!" re-includes
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path, glob + "/*") or path.startswith(glob + "/"):
            ignored = not negate
    return ignored


def test_the_deployment_names_no_path_of_this_checkout() -> None:
    """The files run on other machines: no absolute path of this one, and no secret value, is written in them."""
    for path in [COMPOSE, PLATFORM / "Dockerfile", PLATFORM / "env.example", *K8S.glob("*.yaml")]:
        text = path.read_text()
        assert str(ROOT) not in text, path
    lines = (PLATFORM / "env.example").read_text().splitlines()
    example = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    assert all(not example[name] for name in REQUIRED), "env.example must leave every secret empty"
