"""Deploying: the image, docker compose and the Kubernetes manifests are valid and hold together.

No container engine runs here, so the image's install steps (the pip commands of
deploy/Dockerfile) run in a fresh virtual environment; compose.yaml is checked against
the compose specification; the Kubernetes overlay is rendered with ``kubectl
kustomize`` and every object validated against its schema. The SIGTERM drain that the
grace periods are computed from is measured with a real worker and SMTP server.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rohrpost.catcher import MailCatcher, free_port
from rohrpost.consumer.render import RenderLimits, TemplateRenderer
from rohrpost.producer.client import Producer
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.container import MailContainer
from rohrpost.shared.settings import Settings, settings_from_mapping
from rohrpost.shared.timeparse import parse_duration
from rohrpost.shared.topology import Topology
from tests.conftest import declare, get, rohrpost_command, wait_until, write_config
from tests.test_distribution import SOURCES

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAY = KUBERNETES / "overlays" / "example"
BIN = Path(sys.executable).parent  # hadolint, check-jsonschema: the dev extra's commands
HEALTHCHECK = "/usr/local/lib/rohrpost/healthcheck.py"  # where the Dockerfile puts it
#: Paths inside the image, and where the fresh-venv test puts them instead.
IMAGE_WHEELS, IMAGE_VENV = "/wheels", "/opt/rohrpost"

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl missing")


def load_script(path: Path) -> ModuleType:
    """Import a script under deploy/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


drain_budget = load_script(DEPLOY / "drain_budget.py")
prometheusrule = load_script(KUBERNETES / "prometheusrule.py")


# -- the image ------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), one list per stage."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), " ".join(arguments.split())))
    return stages


def pip_steps(stage: list[tuple[str, str]]) -> list[str]:
    """The RUN commands of a stage that install with pip."""
    return [arguments for keyword, arguments in stage if keyword == "RUN" and " pip " in arguments]


def as_local(command: str, wheels: Path, venv: Path) -> str:
    """An image RUN command rewritten for this machine: its paths, this interpreter."""
    command = re.sub(r"^(--mount=\S+\s+)+", "", command)
    command = command.replace(IMAGE_VENV, str(venv)).replace(IMAGE_WHEELS, str(wheels))
    return re.sub(r"(?<![\w/.-])python(?= )", shlex.quote(sys.executable), command)


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_built_from_exactly_the_sources_the_wheel_is_built_from() -> None:
    builder, runtime = dockerfile_stages()
    copied = {
        source.rstrip("/")
        for keyword, arguments in builder
        if keyword == "COPY"
        for source in arguments.split()[:-1]
    }
    assert copied == set(SOURCES)
    runtime_files = {a.split()[0] for k, a in runtime if k == "COPY" and "--from" not in a}
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == set(SOURCES) | runtime_files
    assert "*" in lines, "the build context is a whitelist"


def test_the_image_runs_rohrpost_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    _, runtime = dockerfile_stages()
    settings = dict(runtime)  # the last of each keyword
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", settings["USER"])
    assert json.loads(settings["ENTRYPOINT"]) == ["rohrpost"]
    assert settings["HEALTHCHECK"].endswith(f'CMD ["python", "{HEALTHCHECK}"]')
    assert {p for k, a in runtime if k == "EXPOSE" for p in a.split()} == {"9750", "9751", "8025"}


def test_no_secret_is_baked_into_the_image() -> None:
    names = [
        part.split("=")[0]
        for stage in dockerfile_stages()
        for keyword, arguments in stage
        if keyword in ("ENV", "ARG")
        for part in arguments.split()
    ]
    assert names, "the runtime stage sets its PATH"
    assert all(re.fullmatch(r"PATH|PYTHON[A-Z]+", name) for name in names), names


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment made by the Dockerfile's own pip commands, from a clean copy."""
    source = tmp_path_factory.mktemp("image-src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    wheels = tmp_path_factory.mktemp("image-wheels")
    venv = tmp_path_factory.mktemp("image") / "venv"
    builder, runtime = dockerfile_stages()
    steps = pip_steps(builder) + pip_steps(runtime)
    assert len(steps) == 2, "one pip step builds the wheels, one installs them"
    for step in steps:
        result = subprocess.run(
            ["sh", "-c", as_local(step, wheels, venv)],
            cwd=source,  # the builder's WORKDIR
            capture_output=True,
            text=True,
            check=False,
            timeout=540,
        )
        assert result.returncode == 0, (step, result.stdout[-3000:], result.stderr[-3000:])
    return venv


@pytest.mark.xdist_group("distribution")
@pytest.mark.timeout(600)
def test_the_image_install_has_the_command_of_every_role(image_venv: Path) -> None:
    command = str(image_venv / "bin" / "rohrpost")
    listed = subprocess.run([command, "--help"], capture_output=True, text=True, check=True)
    names = set(re.findall(r"^  ([a-z-]+)\s", listed.stdout.split("Commands:")[1], re.M))
    assert {"worker", "history-consumer", "run", "store", "topology", "submit"} <= names
    for role in ("worker", "history-consumer", "run"):
        shown = subprocess.run(
            [command, role, "--help"], check=False, capture_output=True, text=True
        )
        assert shown.returncode == 0, shown.stderr
        assert "--metrics-port" in shown.stdout


def _queue_exists(settings: Settings, queue: str) -> bool:
    try:
        with admin_channel(settings.broker_url.get_secret_value()) as channel:
            channel.queue_declare(queue, passive=True)
    except Exception:  # a passive declare of a missing queue closes the channel
        return False
    return True


@pytest.mark.xdist_group("distribution")
@pytest.mark.timeout(600)
def test_the_image_install_declares_and_deletes_a_topology(
    image_venv: Path, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    config = write_config(settings, tmp_path / "rohrpost.toml")
    command = [str(image_venv / "bin" / "rohrpost"), "--config", str(config), "topology"]
    queue = Topology.from_settings(settings).send_queue("acme", "billing")
    declared = subprocess.run(
        [*command, "declare"], check=False, capture_output=True, text=True, timeout=60
    )
    assert declared.returncode == 0, declared.stderr
    assert _queue_exists(settings, queue)
    deleted = subprocess.run(
        [*command, "delete", "--yes"], check=False, capture_output=True, text=True, timeout=60
    )
    assert deleted.returncode == 0, deleted.stderr
    assert not _queue_exists(settings, queue)


@pytest.mark.xdist_group("distribution")
@pytest.mark.timeout(600)
def test_the_image_healthcheck_follows_a_worker_from_start_to_sigterm(
    image_venv: Path, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    port = free_port()
    settings = make_settings(metrics_port=port)
    config = write_config(settings, tmp_path / "rohrpost.toml")
    python = str(image_venv / "bin" / "python")  # `python` on the image's PATH

    def healthcheck(*args: str) -> int:
        check = [python, str(DEPLOY / "healthcheck.py"), str(port), *args]
        return subprocess.run(check, capture_output=True, check=False, timeout=30).returncode

    assert healthcheck() == 1, "nothing answers yet"
    worker = subprocess.Popen(
        [str(image_venv / "bin" / "rohrpost"), "--config", str(config), "worker"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: healthcheck("/readyz") == 0)
        assert healthcheck() == 0
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert healthcheck() == 1


# -- the SIGTERM drain ----------------------------------------------------------------


def _in_flight(port: int) -> float | None:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return None
    for family in text_string_to_metric_families(body):
        if family.name == "rohrpost_mails_in_flight":
            return sum(sample.value for sample in family.samples)
    return None


@contextlib.contextmanager
def silent_smtp_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (no SMTP greeting)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


def _mails(count: int) -> list[dict[str, object]]:
    return [
        {
            "tenant": "acme",
            "app": "billing",
            "to": [f"r{i}@example.com"],
            "subject": "s",
            "text": "t",
        }
        for i in range(count)
    ]


# (prefetch, threads, catcher latency in seconds or None for a silent server, SMTP timeout)
DRAINS = {
    "a slow server": (20, 4, 0.5, "5s"),
    "a silent server": (8, 2, None, "1s"),
}


@pytest.mark.parametrize("case", DRAINS)
def test_a_sigterm_drain_finishes_every_held_mail_within_the_budget(
    case: str,
    make_settings: Callable[..., Settings],
    catcher: MailCatcher,
    tmp_path: Path,
    record_property: Callable[[str, Any], None],
) -> None:
    prefetch, threads, latency, timeout = DRAINS[case]
    with contextlib.ExitStack() as stack:
        smtp_port = catcher.port if latency else stack.enter_context(silent_smtp_server())
        catcher.latency = latency or 0.0
        metrics = free_port()
        settings = make_settings(
            prefetch=prefetch,
            threads=threads,
            metrics_port=metrics,
            smtp={"catcher": {"port": smtp_port, "timeout": timeout}},
        )
        declare(settings)
        config = write_config(settings, tmp_path / "rohrpost.toml")
        with Producer(settings) as producer:
            producer.submit_many(_mails(3 * prefetch))
        budget = drain_budget.DrainBudget.of(settings)
        with (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.Popen(rohrpost_command(config, "worker"), stderr=log)
        try:
            wait_until(lambda: _in_flight(metrics) == prefetch)  # the window is full
            signalled = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=budget.seconds + 30)
            drained = time.monotonic() - signalled
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert code == 0
    lines = (tmp_path / "worker.log").read_text().splitlines()
    stopped = [json.loads(line) for line in lines if '"worker stopped"' in line]
    assert [line["in_flight"] for line in stopped] == [0]
    per_mail = latency or parse_duration(timeout).total_seconds()
    model = budget.rounds * per_mail
    record_property(
        "figure",
        f"SIGTERM drain, {case}: {budget.held} mails held, {threads} threads, "
        f"{per_mail:g} s a mail -> {budget.rounds} rounds = {model:g} s; measured "
        f"{drained:.2f} s; budget {budget.seconds:g} s",
    )
    assert drained <= budget.seconds


@needs_kubectl
def test_the_kubernetes_workers_grace_period_covers_their_worst_case_drain(
    rendered: list[dict[str, Any]],
) -> None:
    worker = one(rendered, "Deployment", "rohrpost-worker")
    seconds = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    budget = drain_budget.DrainBudget.of(configured(rendered))
    assert seconds >= budget.seconds, budget.explain()


def test_the_compose_workers_grace_period_covers_their_worst_case_drain() -> None:
    period = compose()["services"]["worker"]["stop_grace_period"]
    budget = drain_budget.budget_of_file(DEPLOY / "compose" / "rohrpost.toml")
    assert parse_duration(period).total_seconds() >= budget.seconds, budget.explain()


# -- docker compose -------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def rohrpost_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service["image"].startswith("rohrpost:")
    }


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_compose_yaml_follows_the_compose_specification() -> None:
    result = check_compose_schema(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("line", "broken"),
    [
        ("    stop_grace_period: 2m", "    stop_grace: 2m"),
        ("    condition: service_healthy", "    condition: healthy"),
        ("  cap_drop:", "  cap_dropped:"),  # the anchor every rohrpost service merges
    ],
)
def test_the_compose_check_refuses_a_broken_file(line: str, broken: str, tmp_path: Path) -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    assert line + "\n" in text
    (tmp_path / "compose.yaml").write_text(text.replace(line + "\n", broken + "\n", 1))
    assert check_compose_schema(tmp_path / "compose.yaml").returncode == 1


def test_every_file_compose_mounts_exists() -> None:
    mounts = [
        volume.split(":")[0]
        for service in compose()["services"].values()
        for volume in service.get("volumes", [])
        if volume.startswith(".")
    ]
    assert len(mounts) >= 6
    for mount in mounts:
        assert (DEPLOY / mount).exists(), mount


def test_compose_takes_every_password_from_the_env_file() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = (DEPLOY / ".env.example").read_text()
    offered = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    assert {"RABBITMQ_PASSWORD", "POSTGRES_PASSWORD", "REDIS_PASSWORD"} <= required <= offered
    # every URL with a user part takes its password from a variable
    for userinfo in re.findall(r"://([^@/\s]*)@", text):
        assert re.fullmatch(r"[a-z]*:\$\{[A-Z_]+:\?[^}]*\}", userinfo), userinfo
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT, check=False, timeout=30
    )
    assert ignored.returncode == 0, "deploy/.env must never be committed"


def test_compose_starts_each_process_after_what_it_needs() -> None:
    services = rohrpost_services()
    assert set(services) == {"migrate", "worker", "history-consumer", "console"}
    assert services["migrate"]["command"] == ["store", "migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("worker", "history-consumer", "console"):
        needs = services[name]["depends_on"]
        for base in ("rabbitmq", "redis", "mailpit"):
            assert needs[base] == {"condition": "service_healthy"}, (name, base)
    for name in ("history-consumer", "console"):
        migrated = services[name]["depends_on"]["migrate"]
        assert migrated == {"condition": "service_completed_successfully"}
    for name, service in compose()["services"].items():
        if name != "migrate":
            assert "test" in service.get("healthcheck", {}), name


def test_compose_probes_each_process_on_its_own_port() -> None:
    services = rohrpost_services()
    ports = {"worker": "9750", "history-consumer": "9751", "console": "8025"}
    for name, port in ports.items():
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", HEALTHCHECK] and test[3] == port, name


def test_the_compose_configuration_sends_the_demo_tenant_to_mailpit() -> None:
    config = tomllib.loads((DEPLOY / "compose" / "rohrpost.toml").read_text())
    settings = settings_from_mapping(config)
    assert settings.routes() == [("demo", "welcome")]
    server = settings.smtp[settings.tenants["demo"].apps["welcome"].smtp]
    assert (server.host, server.port) == ("mailpit", 1025)
    environment = compose()["services"]["worker"]["environment"]
    assert server.password_env in environment
    assert not {"broker_url", "store_url", "redis_url"} & set(config), "URLs carry passwords"


def test_the_compose_demo_template_renders() -> None:
    config = tomllib.loads((DEPLOY / "compose" / "rohrpost.toml").read_text())
    limits = RenderLimits.of(settings_from_mapping(config))
    renderer = TemplateRenderer(DEPLOY / "compose" / "templates", limits)
    mail = MailContainer.model_validate(
        {
            "tenant": "demo",
            "app": "welcome",
            "to": ["anna@example.com"],
            "template": "welcome",
            "data": {"name": "Anna"},
        }
    )
    try:
        rendered = renderer.render(mail)
    finally:
        renderer.close()
    assert rendered.subject == "Welcome to rohrpost, Anna"
    assert rendered.text is not None and "Hello Anna," in rendered.text
    assert rendered.html is not None and "<p>Hello Anna,</p>" in rendered.html


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool missing (package prometheus)"
)
def test_the_compose_prometheus_config_and_its_rules_pass_promtool() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", "compose.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_grafana_is_provisioned_with_the_dashboard_compose_mounts() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "rohrpost.yml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    assert mounts["./grafana/rohrpost.json"] == f"{folder}/rohrpost.json"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert (source["type"], source["url"], source["isDefault"]) == (
        "prometheus",
        "http://prometheus:9090",
        True,
    )


def test_rabbitmq_in_compose_enables_the_management_and_prometheus_plugins() -> None:
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text().strip()
    assert re.fullmatch(r"\[[a-z_,]+\]\.", plugins)
    assert set(plugins[1:-2].split(",")) == {"rabbitmq_management", "rabbitmq_prometheus"}
    volumes = compose()["services"]["rabbitmq"]["volumes"]
    assert "./rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro" in volumes


# -- Kubernetes -----------------------------------------------------------------------


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """Every object ``kubectl kustomize folder`` renders."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(folder)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """The example overlay, rendered."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl missing")
    return kustomize(OVERLAY)


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def _schema_registry() -> referencing.Registry[Any]:
    resources = [
        (
            f"https://rohrpost.invalid/schemas/{path.name}",
            referencing.Resource.from_contents(json.loads(path.read_text())),
        )
        for path in (KUBERNETES / "schemas").glob("*.json")
    ]
    return referencing.Registry().with_resources(resources)


def custom_resource_errors(document: dict[str, Any]) -> list[str]:
    """Errors of a custom resource against its committed schema ([] when valid)."""
    group, _, version = document["apiVersion"].rpartition("/")
    path = KUBERNETES / "schemas" / f"{document['kind'].lower()}-{group}-{version}.json"
    assert path.exists(), f"no schema for {document['kind']} {document['apiVersion']}"
    validator = jsonschema.Draft202012Validator(
        json.loads(path.read_text()), registry=_schema_registry()
    )
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def is_custom(document: dict[str, Any]) -> bool:
    group = document["apiVersion"].rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


@needs_kubectl
def test_every_rendered_object_validates_against_its_schema(
    rendered: list[dict[str, Any]],
) -> None:
    version = kubernetes_validate.latest_version()
    kinds = {o["kind"] for o in rendered}
    assert {"Deployment", "StatefulSet", "PodDisruptionBudget", "ConfigMap", "Secret"} <= kinds
    assert {"ScaledObject", "TriggerAuthentication", "RabbitmqCluster"} <= kinds
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds
    errors = []
    for document in rendered:
        where = f"{document['kind']}/{document['metadata']['name']}"
        if is_custom(document):
            errors += [f"{where} {error}" for error in custom_resource_errors(document)]
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{where} {list(error.absolute_path)}: {error.message}")
    assert errors == []


def _trigger(document: dict[str, Any]) -> dict[str, Any]:
    trigger: dict[str, Any] = document["spec"]["triggers"][0]["metadata"]
    return trigger


def _first_rule(document: dict[str, Any]) -> dict[str, Any]:
    rule: dict[str, Any] = document["spec"]["groups"][0]["rules"][0]
    return rule


MISTAKES: dict[str, tuple[str, Callable[[dict[str, Any]], object]]] = {
    "a misspelt scaler parameter": ("ScaledObject", lambda d: _trigger(d).update(queuename="x")),
    "a regex over AMQP": ("ScaledObject", lambda d: _trigger(d).update(protocol="amqp")),
    "a boolean where KEDA wants a string": (
        "ScaledObject",
        lambda d: _trigger(d).update(useRegex=True),
    ),
    "no scale target": ("ScaledObject", lambda d: d["spec"].pop("scaleTargetRef")),
    "a secret reference without key": (
        "TriggerAuthentication",
        lambda d: d["spec"]["secretTargetRef"][0].pop("key"),
    ),
    "a scrape interval that is no duration": (
        "ServiceMonitor",
        lambda d: d["spec"]["endpoints"][0].update(interval="often"),
    ),
    "a rule without expression": ("PrometheusRule", lambda d: _first_rule(d).pop("expr")),
    "a misspelt replica count": ("RabbitmqCluster", lambda d: d["spec"].update(replica=3)),
}


@needs_kubectl
@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_custom_resource_schemas_refuse_a_mistake(
    mistake: str, rendered: list[dict[str, Any]]
) -> None:
    kind, make = MISTAKES[mistake]
    document = next(o for o in rendered if o["kind"] == kind)
    assert custom_resource_errors(document) == []
    broken = json.loads(json.dumps(document))
    make(broken)
    assert custom_resource_errors(broken)


@needs_kubectl
def test_every_pod_runs_non_root_read_only_and_unprivileged(
    rendered: list[dict[str, Any]],
) -> None:
    specs = pod_specs(rendered)
    assert set(specs) == {
        "rohrpost-worker",
        "rohrpost-history-consumer",
        "rohrpost-console",
        "redis",
    }
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"] + spec.get("initContainers", []):
            where = (name, container["name"])
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert "memory" in container["resources"]["limits"], where


@needs_kubectl
def test_every_rohrpost_process_gets_a_writable_tmp_and_its_configuration(
    rendered: list[dict[str, Any]],
) -> None:
    for name, spec in pod_specs(rendered).items():
        if not name.startswith("rohrpost-"):
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"]
        assert volumes["config"]["configMap"]["name"].startswith("rohrpost-config-")
        for container in spec["containers"] + spec.get("initContainers", []):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts == {"/tmp": "tmp", "/etc/rohrpost": "config"}, (name, container["name"])
            env = {e["name"]: e for e in container["env"]}
            assert env["ROHRPOST_CONFIG"]["value"] == "/etc/rohrpost/rohrpost.toml"


PROBES = {
    # deployment: (port, liveness path, readiness path, arguments)
    "rohrpost-worker": (9750, "/healthz", "/readyz", ["worker", "--metrics-port", "9750"]),
    "rohrpost-history-consumer": (
        9751,
        "/healthz",
        "/readyz",
        ["history-consumer", "--metrics-port", "9751"],
    ),
    "rohrpost-console": (
        8025,
        "/healthz",
        "/healthz",
        ["console", "--host", "0.0.0.0", "--port", "8025"],
    ),
}


@needs_kubectl
@pytest.mark.parametrize("deployment", PROBES)
def test_each_process_is_probed_on_the_port_it_serves(
    deployment: str, rendered: list[dict[str, Any]]
) -> None:
    port, live, ready, args = PROBES[deployment]
    (container,) = pod_specs(rendered)[deployment]["containers"]
    assert container["args"] == args
    (declared,) = container["ports"]
    assert declared["containerPort"] == port
    assert container["livenessProbe"]["httpGet"] == {"path": live, "port": declared["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": ready, "port": declared["name"]}
    assert container["image"] == "registry.example.com/rohrpost:0.1.0"


STANDARD = {"app.kubernetes.io/name", "app.kubernetes.io/part-of"}
OURS = STANDARD | {
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
}


@needs_kubectl
def test_every_object_carries_the_standard_labels(rendered: list[dict[str, Any]]) -> None:
    for document in rendered:
        labels = document["metadata"].get("labels", {})
        where = f"{document['kind']}/{document['metadata']['name']}"
        assert set(labels) >= STANDARD, where
        assert labels["app.kubernetes.io/part-of"] == "rohrpost", where
        made_by_the_base = document["kind"] not in ("Namespace", "Secret", "ConfigMap")
        if labels["app.kubernetes.io/name"] == "rohrpost" and made_by_the_base:
            assert set(labels) >= OURS, where


@needs_kubectl
def test_every_workload_selects_its_pods_by_component(rendered: list[dict[str, Any]]) -> None:
    workloads = [o for o in rendered if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 4
    for workload in workloads:
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert "app.kubernetes.io/component" in pod_labels, workload["metadata"]["name"]
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        assert "app.kubernetes.io/version" not in selector, "selectors cannot change later"


def configured(rendered: list[dict[str, Any]]) -> Settings:
    (config,) = [o for o in rendered if o["kind"] == "ConfigMap"]
    return settings_from_mapping(tomllib.loads(config["data"]["rohrpost.toml"]))


@needs_kubectl
def test_the_scaled_object_counts_exactly_the_send_queues(rendered: list[dict[str, Any]]) -> None:
    topology = Topology.from_settings(configured(rendered))
    send = {queue for t, a in topology.routes for queue in topology.send_queues(t, a)}
    others = {topology.dead_queue(t, a) for t, a in topology.routes}
    others |= {*topology.delay_queues(), topology.history_queue, topology.history_rejected_queue}
    assert len(send) == 6 and len(others) > 50  # two routes, three priority lanes each
    scaled = one(rendered, "ScaledObject", "rohrpost-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "rohrpost-worker"
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert (trigger["type"], metadata["mode"], metadata["operation"]) == (
        "rabbitmq",
        "QueueLength",
        "sum",
    )
    assert (metadata["useRegex"], metadata["protocol"]) == ("true", "http")
    pattern = re.compile(metadata["queueName"])
    assert {q for q in send | others if pattern.search(q)} == send


@needs_kubectl
def test_passwords_reach_the_pods_only_from_secrets(rendered: list[dict[str, Any]]) -> None:
    secrets = {o["metadata"]["name"]: o["stringData"] for o in rendered if o["kind"] == "Secret"}
    for values in secrets.values():
        assert all("EXAMPLE" in value for value in values.values()), "example values only"
    settings = configured(rendered)
    assert settings.broker_url.get_secret_value().startswith("amqp://guest:guest@127.0.0.1")
    names = {server.password_env for server in settings.smtp.values()}
    assert names <= set(secrets["rohrpost-smtp"])
    for name, spec in pod_specs(rendered).items():
        for container in spec["containers"] + spec.get("initContainers", []):
            for variable in container.get("env", []):
                if "value" in variable:
                    assert not re.search(r"URL|PASSWORD|HASH", variable["name"]), (name, variable)
                    continue
                ref = variable["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]], (name, ref)
            for source in container.get("envFrom", []):
                assert source["secretRef"]["name"] in secrets, name
    (trigger_secret,) = one(rendered, "TriggerAuthentication", "rohrpost-rabbitmq-management")[
        "spec"
    ]["secretTargetRef"]
    assert trigger_secret["key"] in secrets[trigger_secret["name"]]


@needs_kubectl
def test_the_base_holds_no_secret_and_no_configuration() -> None:
    kinds = {o["kind"] for o in kustomize(KUBERNETES / "base")}
    assert not kinds & {"Secret", "ConfigMap", "Namespace"}


def test_the_prometheus_rule_is_generated_from_the_rules_file() -> None:
    rules = (DEPLOY / "prometheus" / "rules" / "rohrpost.yml").read_text()
    committed = (KUBERNETES / "base" / "prometheusrule.yaml").read_text()
    assert committed == prometheusrule.render(rules), (
        "run python deploy/kubernetes/prometheusrule.py"
    )
    assert yaml.safe_load(committed)["spec"] == yaml.safe_load(rules)


@needs_kubectl
def test_the_version_label_and_image_tag_are_the_package_version(
    rendered: list[dict[str, Any]],
) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    worker = one(rendered, "Deployment", "rohrpost-worker")
    assert worker["metadata"]["labels"]["app.kubernetes.io/version"] == version
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(f":{version}")


def test_the_drain_budget_script_names_a_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing, broken = tmp_path / "missing.toml", tmp_path / "broken.toml"
    broken.write_text("prefetch = [")
    assert drain_budget.main(["drain_budget.py", str(missing)]) == 2
    assert f"error: {missing}: No such file or directory" in capsys.readouterr().err
    assert drain_budget.main(["drain_budget.py", str(broken)]) == 2
    assert f"error: {broken}: " in capsys.readouterr().err
