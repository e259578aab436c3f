"""The baseline: the same mails rendered and sent by plain processes, no broker, no durability.

Each process renders with jinja2, builds the message with the standard library's
modern ``EmailMessage`` API and sends it with ``send_message`` over one reused
``smtplib`` connection — the hand-rolled SMTP loop rohrpost competes with.
"""

from __future__ import annotations

import multiprocessing
import smtplib
import threading
import time
from email.message import EmailMessage
from typing import Any

import jinja2

from bench.workload import APP, TEMPLATE, TEMPLATES, TENANT, data, recipient


def _send_share(port: int, start: int, stop: int, ready: Any) -> None:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES / TENANT / APP / TEMPLATE)),
        autoescape=jinja2.select_autoescape(["html.j2"]),
    )
    subject, text, html = (env.get_template(f"{p}.j2") for p in ("subject", "text", "html"))
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        ready.wait()  # start the clock once every process is connected
        for i in range(start, stop):
            values = data(i)
            message = EmailMessage()
            message["From"] = "shop@acme.example"
            message["To"] = recipient(i)
            message["Subject"] = subject.render(values).strip()
            message.set_content(text.render(values))
            message.add_alternative(html.render(values), subtype="html")
            smtp.send_message(message)


def measure(port: int, count: int, processes: int = 2) -> float:
    """Send ``count`` mails with ``processes`` plain processes; return mails per second."""
    context = multiprocessing.get_context("spawn")
    share = count // processes
    ready = context.Barrier(processes + 1)
    workers = [
        context.Process(target=_send_share, args=(port, n * share, (n + 1) * share, ready))
        for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        ready.wait(timeout=120)
    except threading.BrokenBarrierError:
        for worker in workers:
            worker.kill()
        raise RuntimeError("a baseline process did not start") from None
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    if any(worker.exitcode != 0 for worker in workers):
        raise RuntimeError("a baseline process failed")
    return share * processes / elapsed
