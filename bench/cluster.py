"""``python -m bench cluster``: mails through a three-node RabbitMQ cluster while nodes die.

``--mails`` (10,000) are submitted at a steady ``--rate`` and sent by ``rohrpost run
--processes 2`` (two workers and the history consumer), every client given the three
nodes in the same order. While that runs, first a node no client is connected to,
then the node the producer, the workers and the history consumer are connected to,
is killed with SIGKILL and started again ``--down`` seconds later. Then: was every
confirmed mail delivered (and how many twice), does every mail end in exactly one
terminal state in the history, did each killed node rejoin — and is the machine's own
node still alone and healthy. ``--teardown`` only removes what an interrupted run
left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from bench import cluster_figures as figures
from bench.environment import _delete_shared_state, wait_for
from bench.rabbitnodes import BASE, ClusterError, LocalCluster, Node, default_node_check
from bench.workload import TEMPLATES, mails, recipient
from rohrpost.catcher import MailCatcher, free_port
from rohrpost.producer.client import Producer, SubmitManyError
from rohrpost.shared.broker import admin_channel
from rohrpost.shared.settings import Settings, settings_from_mapping
from rohrpost.shared.topology import Topology

#: Fractions of the mails delivered at which the first and the second node is killed.
KILL_AT = (0.10, 0.35)
CHUNK = 50
WORKERS = 2
#: What a run started outside the nodes, so that ``--teardown`` finds it after a crash.
LEFTOVERS = BASE / "run.json"


@dataclass
class Outage:
    """One node killed and started again; times are Unix times."""

    node: str
    clients: list[str]
    killed_at: float
    while_submitting: bool = False
    started_at: float = 0.0
    rejoined_at: float = 0.0
    #: end of what is counted as its aftermath: the next kill, or WINDOW seconds later
    until: float = 0.0


class _BrokerLines(logging.Handler):
    """The producer's broker lines, with their times: where it connected, what was nacked."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.connected: list[tuple[float, str]] = []
        self.nacked: list[float] = []  # each time the broker nacked a publish (and it went again)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message == "connected to broker":
            self.connected.append((record.created, str(getattr(record, "node", ""))))
        elif message == "broker nacked a publish; publishing it again":
            self.nacked.append(record.created)


@dataclass
class Submitter:
    """Submits the mails at a steady rate from its own thread, through its own Producer."""

    settings: Settings
    count: int
    rate: float
    confirmed: set[uuid.UUID] = field(default_factory=set)
    #: (when, how many mails, why) of every chunk the broker did not confirm
    failures: list[tuple[float, int, str]] = field(default_factory=list)
    confirm_times: list[float] = field(default_factory=list)
    ids: list[uuid.UUID] = field(default_factory=list)
    lines: _BrokerLines = field(default_factory=_BrokerLines)
    thread: threading.Thread | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="submitter", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        broker_log = logging.getLogger("rohrpost.shared.broker")
        broker_log.addHandler(self.lines)
        broker_log.setLevel(logging.DEBUG)
        broker_log.propagate = False  # counted here, not printed
        batch = list(mails(self.count))
        for container in batch:
            container["id"] = str(uuid.uuid4())
        self.ids = [uuid.UUID(c["id"]) for c in batch]
        began = time.monotonic()
        with Producer(self.settings) as producer:
            for start in range(0, self.count, CHUNK):
                if self.stopping.is_set():
                    return
                chunk = batch[start : start + CHUNK]
                try:
                    self.confirmed.update(producer.submit_many(chunk, window=2 * CHUNK))
                except SubmitManyError as exc:
                    self.confirmed.update(exc.submitted)
                    self.failures.append((time.time(), len(chunk) - len(exc.submitted), str(exc)))
                self.confirm_times.append(time.time())
                ahead = began + (start + CHUNK) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(120)


def _wait(
    what: str, condition: Callable[[], Any], timeout: float, *, required: bool = True
) -> bool:
    """Poll ``condition``; False (or ClusterError, if ``required``) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            if required:
                raise ClusterError(f"timed out after {timeout:g}s waiting for {what}")
            _say(f"gave up waiting for {what} after {timeout:g}s")
            return False
        time.sleep(0.25)
    return True


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')}  {message}", flush=True)


@contextlib.contextmanager
def _installation(cluster: LocalCluster, catcher: MailCatcher) -> Iterator[tuple[Settings, Path]]:
    """A namespace on the cluster, its config file and workdir; all removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="rohrpost-cluster-"))
    settings = settings_from_mapping(
        {
            "broker_url": cluster.urls(),
            "namespace": f"cluster{uuid.uuid4().hex[:8]}",
            "templates_dir": str(TEMPLATES),
            "store_url": f"sqlite:///{workdir / 'history.db'}",
            "metrics_port": 0,
            "smtp": {"catcher": {"host": "127.0.0.1", "port": catcher.port}},
            "tenants": {
                "acme": {"apps": {"shop": {"smtp": "catcher", "sender": "shop@acme.example"}}}
            },
        }
    )
    data = settings.model_dump(mode="json", exclude_none=True)
    data |= {"broker_url": cluster.urls(), "store_url": settings.store_url.get_secret_value()}
    data["redis_url"] = settings.redis_url.get_secret_value() if settings.redis_url else ""
    config = workdir / "rohrpost.toml"
    config.write_text(tomli_w.dumps(data))
    _remember(namespace=settings.namespace, workdir=str(workdir))
    url = settings.broker_url.get_secret_value()
    topology = Topology.from_settings(settings)
    with admin_channel(url) as channel:  # after the cluster formed: three members each
        topology.declare(channel)
    try:
        yield settings, workdir
    finally:
        with contextlib.suppress(Exception), admin_channel(url) as channel:
            topology.delete(channel)
        _delete_shared_state(settings)
        shutil.rmtree(workdir, ignore_errors=True)


def _start_processes(config: Path, workdir: Path) -> subprocess.Popen[bytes]:
    port = free_port()
    log = (workdir / "rohrpost.log").open("wb")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "rohrpost", "--config", str(config), "--log-format", "json"),
            *("run", "--processes", str(WORKERS), "--metrics-port", str(port)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _remember(pid=process.pid)
    wait_for(f"http://127.0.0.1:{port}/readyz", timeout=120)
    return process


def _remember(**facts: Any) -> None:
    known = json.loads(LEFTOVERS.read_text()) if LEFTOVERS.exists() else {}
    LEFTOVERS.write_text(json.dumps(known | facts))


def _clean_leftovers() -> None:
    """Stop the ``rohrpost run`` an interrupted run left, forget its Redis keys and files."""
    if not LEFTOVERS.exists():
        return
    known = json.loads(LEFTOVERS.read_text())
    with contextlib.suppress(psutil.Error, KeyError):
        process = psutil.Process(known["pid"])
        if "rohrpost" in " ".join(process.cmdline()):  # that pid, if it is still ours
            process.terminate()
            try:
                process.wait(120)
            except psutil.TimeoutExpired:
                process.kill()
    if "namespace" in known:
        _delete_shared_state(settings_from_mapping({"namespace": known["namespace"]}))
    if "workdir" in known:
        shutil.rmtree(known["workdir"], ignore_errors=True)


def _kill_and_restart(cluster: LocalCluster, node: Node, prefix: str, down: float) -> Outage:
    clients = node.connections()
    outage = Outage(node.name, clients, time.time())
    node.kill()
    _say(f"killed {node.name} with SIGKILL; it served {len(clients)} connections {clients}")
    time.sleep(down)  # the length of the outage: a parameter of the scenario
    node.start()
    outage.started_at = time.time()
    _say(f"started {node.name} again; waiting until it rejoined every queue")
    _wait(f"{node.name} to rejoin", lambda: cluster.rejoined(node, prefix), timeout=300)
    outage.rejoined_at = time.time()
    _say(f"{node.name} rejoined, {outage.rejoined_at - outage.killed_at:.1f} s after the kill")
    return outage


def _outage_figures(
    number: int, outage: Outage, submitter: Submitter, catcher: MailCatcher, log: Path
) -> dict[str, Any]:
    """What happened from a kill until ``outage.until``."""
    since, until = outage.killed_at, outage.until
    received = [mail.received_at for mail in catcher.mails]
    producer = [
        round(at - since, 2) for at, _node in submitter.lines.connected if since <= at < until
    ]
    return {
        f"kill {number}: node": outage.node,
        f"kill {number}: its client connections": dict(Counter(outage.clients)) or "none",
        f"kill {number}: while mails were being submitted": outage.while_submitting,
        f"kill {number}: longest pause in SMTP deliveries (s)": figures.longest_pause(
            received, since, until
        ),
        f"kill {number}: longest pause in submit confirms (s)": figures.longest_pause(
            submitter.confirm_times, since, until
        ),
        f"kill {number}: producer reconnected after (s)": producer or "no reconnect",
        f"kill {number}: publishes nacked, then published again": sum(
            1 for at in submitter.lines.nacked if since <= at < until
        ),
        f"kill {number}: mails not confirmed (s after the kill, mails)": [
            (round(at - since, 1), mails)
            for at, mails, _ in submitter.failures
            if since <= at < until
        ]
        or "none",
        f"kill {number}: processes reconnected": figures.reconnections(log, since, until) or "none",
        f"kill {number}: started again after (s)": round(outage.started_at - since, 1),
        f"kill {number}: rejoined every queue after (s)": round(outage.rejoined_at - since, 1),
    }


def _scenario(
    cluster: LocalCluster, catcher: MailCatcher, settings: Settings, workdir: Path, args: Any
) -> dict[str, Any]:
    count, prefix = args.mails, f"{settings.namespace}."
    submitter = Submitter(settings, count, args.rate)
    ids: dict[str, uuid.UUID] = {}
    members = Counter(len(m) for m, _ in cluster.members(cluster.nodes[0], prefix).values())
    process = _start_processes(workdir / "rohrpost.toml", workdir)
    began = time.time()
    outages = []
    try:
        submitter.start()
        for fraction, victim in zip(KILL_AT, (cluster.nodes[2], cluster.nodes[0]), strict=True):
            _wait(
                f"{fraction:.0%} of the mails delivered",
                lambda f=fraction: len(catcher.mails) >= f * count,
                timeout=900,
            )
            submitting = not submitter.done()
            outages.append(_kill_and_restart(cluster, victim, prefix, args.down))
            outages[-1].while_submitting = submitting
        _wait("the submitter to finish", submitter.done, timeout=900)
        ids = {recipient(i): mail_id for i, mail_id in enumerate(submitter.ids)}
        delivered_all = _wait(
            "every confirmed mail to be delivered",
            lambda: submitter.confirmed <= set(figures.deliveries(catcher.mails, ids)),
            timeout=600,
            required=False,
        )
        store_url = settings.store_url.get_secret_value()
        archived = max(len(submitter.confirmed), len(figures.deliveries(catcher.mails, ids)))
        _wait(
            "every mail to reach a terminal state in the history",
            lambda: figures.terminal_count(store_url) >= archived,
            timeout=600,
            required=False,
        )
        finished = time.time()
    finally:
        submitter.stop()
        process.send_signal(signal.SIGTERM)
        process.wait(180)
    result: dict[str, Any] = {
        "elapsed (s)": round(finished - began, 1),
        "submit rate (mails/s)": args.rate,
        "queues by number of members": dict(members),
        "all confirmed mails delivered": delivered_all,
        **figures.delivery_figures(
            count, submitter.confirmed, figures.deliveries(catcher.mails, ids)
        ),
        **figures.history_figures(store_url, submitter.confirmed),
        "submit errors": sorted(
            {re.sub(r"^mail \S+: | \(\d+ mails .*\)$", "", why) for *_, why in submitter.failures}
        )
        or "none",
        # what the workers may hold unacked when their connection drops
        "duplicates allowed (workers x prefetch)": WORKERS * settings.prefetch,
    }
    ends = [outage.killed_at for outage in outages[1:]] + [float("inf")]
    for number, (outage, end) in enumerate(zip(outages, ends, strict=True), 1):
        outage.until = min(end, outage.killed_at + figures.WINDOW)
        result |= _outage_figures(number, outage, submitter, catcher, workdir / "rohrpost.log")
    result["cluster afterwards"] = sorted(cluster.running(cluster.nodes[1]))
    return result


def run(args: Any) -> dict[str, Any]:
    """The whole scenario, cluster set-up and teardown included; its figures."""
    cluster = LocalCluster(args.port)
    if args.teardown:
        _clean_leftovers()
        cluster.teardown()
        return {"default node afterwards": default_node_check()}
    result: dict[str, Any] = {}
    try:
        _clean_leftovers()
        _say("starting three RabbitMQ nodes and joining them into one cluster")
        cluster.up()
        with MailCatcher() as catcher, _installation(cluster, catcher) as (settings, workdir):
            _say(f"cluster formed; {args.mails} mails at {args.rate:g}/s through {cluster.urls()}")
            result = _scenario(cluster, catcher, settings, workdir, args)
    finally:
        _say("removing the extra nodes")
        _clean_leftovers()
        cluster.teardown()
        result["default node afterwards"] = default_node_check()
    return result
