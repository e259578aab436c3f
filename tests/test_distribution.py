"""Distribution: the wheel installs the name ``rohrpost`` only, and the client install is lean.

One wheel is built from a copy of the sources and installed, without extras, into a
fresh virtual environment (its dependencies come from the package index, or pip's
cache); the tests then run Python and the ``rohrpost`` command of that environment
as a publishing service would.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rohrpost.cli import SERVER_MODULES
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.settings import Settings
from rohrpost.shared.topology import Topology
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parent.parent
# Built from the checkout: the sources of the package and what pyproject.toml names.
SOURCES = ("pyproject.toml", "README.md", "rohrpost", "producer", "consumer", "shared")
SERVER_ONLY = sorted(SERVER_MODULES)
HEAVY = json.dumps(SERVER_ONLY)
MAIL_FLAGS = ("--tenant", "acme", "--app", "billing", "--to", "anna@example.com", "--subject", "s")

pytestmark = [pytest.mark.xdist_group("distribution"), pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built in a clean copy of its sources."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("rohrpost-*.whl")
    return built


@pytest.fixture(scope="module")
def client_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh virtual environment with ``pip install rohrpost`` (no extras)."""
    venv = tmp_path_factory.mktemp("client") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
    )
    return python


def run_in(python: Path, code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``python`` in ``cwd`` (first on its import path, as for a service)."""
    return subprocess.run(
        [str(python), "-c", code, *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_wheel_installs_only_the_name_rohrpost(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == {"rohrpost"}
    for package in ("producer", "consumer", "shared", "operations"):
        assert f"rohrpost/{package}/__init__.py" in names
    assert "rohrpost/shared/schema/mail-container.v1.json" in names
    assert any(name.startswith("rohrpost/shared/store/migrations/versions/") for name in names)


def test_the_client_install_has_no_server_packages(client_python: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.util, json, sys\n"
        "print([m for m in json.loads(sys.argv[1]) if importlib.util.find_spec(m)])"
    )
    result = run_in(client_python, code, tmp_path, HEAVY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


_SUBMIT = """
import json, sys
from rohrpost.producer import Producer
from rohrpost.shared.errors import ContainerError
from rohrpost.shared.settings import load_settings

with Producer(load_settings(sys.argv[1])) as producer:
    mail = {"tenant": "acme", "app": "billing", "to": ["anna@example.com"], "subject": "s"}
    mail_id = producer.submit({**mail, "text": "t"})
    try:
        producer.submit({"tenant": "acme", "app": "billing", "to": ["not an address"]})
    except ContainerError as exc:
        refused = str(exc)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[3]))
open(sys.argv[2], "w").write(json.dumps({"id": str(mail_id), "heavy": heavy, "refused": refused}))
"""


def _send_queue_ids(settings: Settings) -> list[str]:
    queue = Topology.from_settings(settings).send_queue("acme", "billing")
    ids = []
    with admin_channel(settings.broker_url.get_secret_value()) as channel:
        while True:
            method, properties, _ = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return ids
            ids.append(properties.message_id)


def test_a_service_submits_through_the_client_install_silently_and_without_server_modules(
    client_python: Path, settings: Settings, tmp_path: Path
) -> None:
    config = write_config(settings, tmp_path / "rohrpost.toml")
    report = tmp_path / "report.json"
    result = run_in(client_python, _SUBMIT, tmp_path, str(config), str(report), HEAVY)
    assert result.returncode == 0, result.stderr
    # No logging configured by the service: the producer writes nothing anywhere.
    assert (result.stdout, result.stderr) == ("", "")
    outcome = json.loads(report.read_text())
    assert outcome["heavy"] == []
    assert outcome["refused"].startswith("to.0:")
    assert _send_queue_ids(settings) == [outcome["id"]]


def test_the_producer_logs_through_the_services_logging_configuration(
    client_python: Path, settings: Settings, tmp_path: Path
) -> None:
    config = write_config(settings, tmp_path / "rohrpost.toml")
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stdout,"
        " format='%(name)s|%(message)s')\n" + _SUBMIT
    )
    report = tmp_path / "report.json"
    result = run_in(client_python, code, tmp_path, str(config), str(report), HEAVY)
    assert result.returncode == 0, result.stderr
    assert "rohrpost.producer.client|mail submitted" in result.stdout.splitlines()


def test_the_client_install_submits_from_the_command_line(
    client_python: Path, settings: Settings, tmp_path: Path
) -> None:
    config = write_config(settings, tmp_path / "rohrpost.toml")
    command = client_python.parent / "rohrpost"
    result = subprocess.run(
        [str(command), "--config", str(config), "submit", *MAIL_FLAGS, "--text", "t"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert _send_queue_ids(settings) == [result.stdout.strip()]


@pytest.mark.parametrize(
    "args",
    [
        ["worker"],
        ["history-consumer"],
        ["run"],
        ["history", "list"],
        ["store", "migrate"],
        ["demo"],
        ["console"],
    ],
)
def test_server_commands_name_the_extra_to_install(
    client_python: Path, args: list[str], tmp_path: Path
) -> None:
    command = client_python.parent / "rohrpost"
    result = subprocess.run(
        [str(command), *args], check=False, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "pip install 'rohrpost[server]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_shows_its_help_in_the_client_install(
    client_python: Path, tmp_path: Path
) -> None:
    command = str(client_python.parent / "rohrpost")
    listed = subprocess.run([command, "--help"], capture_output=True, text=True, check=True)
    names = re.findall(r"^  ([a-z-]+)\s", listed.stdout.split("Commands:")[1], re.M)
    assert {"submit", "worker", "dlq", "history"} <= set(names)
    for name in names:
        shown = subprocess.run([command, name, "--help"], check=False, capture_output=True)
        assert shown.returncode == 0, (name, shown.stderr.decode())


def test_a_service_with_its_own_shared_and_operations_packages_keeps_them(
    client_python: Path, tmp_path: Path
) -> None:
    for name in ("shared", "operations", "producer", "consumer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'service:{name}'\n")
    code = (
        "import shared, operations, producer, consumer\n"
        "from rohrpost.producer import Producer\n"
        "from rohrpost.shared.settings import Settings\n"
        "print(shared.OWNER, operations.OWNER, producer.OWNER, consumer.OWNER, Producer.__name__)"
    )
    result = run_in(client_python, code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "service:shared",
        "service:operations",
        "service:producer",
        "service:consumer",
        "Producer",
    ]


def test_the_editable_install_serves_the_checkout_from_anywhere(tmp_path: Path) -> None:
    code = "import rohrpost.producer, rohrpost.operations; print(rohrpost.producer.__file__)"
    result = run_in(Path(sys.executable), code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(ROOT)


def test_the_server_extra_lists_exactly_the_modules_the_cli_names() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {re.split(r"[\[<>=~ ]", requirement)[0] for requirement in extras["server"]}
    assert {name.replace("-", "_").lower() for name in names} == set(SERVER_MODULES)


def test_install_sizes(client_python: Path, record_property: Callable[[str, Any], None]) -> None:
    """Measure what the client install pulls in (the README quotes these figures)."""
    listed = subprocess.run(
        [str(client_python), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    packages = [
        p["name"] for p in json.loads(listed.stdout) if p["name"] not in ("pip", "setuptools")
    ]
    site = next((client_python.parent.parent / "lib").glob("python*/site-packages"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    size -= sum(
        f.stat().st_size
        for pattern in ("pip*", "setuptools*", "_distutils_hack", "distutils-precedence.pth")
        for top in site.glob(pattern)
        for f in ([top] if top.is_file() else top.rglob("*"))
        if f.is_file()
    )
    assert "rohrpost" in packages
    record_property(
        "figure",
        f"client install: {len(packages)} packages with rohrpost, {size / 2**20:.1f} MiB: "
        + ", ".join(sorted(packages)),
    )
