"""The raw pika ceiling: persistent 1 KiB messages to one quorum queue, windowed confirms.

Plain pika (SelectConnection) and nothing of rohrpost: what this machine's broker
and client library can confirm per second, to compare ``submit_many`` against.
"""

from __future__ import annotations

import time
import uuid

import pika
from pika.adapters.select_connection import SelectConnection

WINDOW = 2000
BODY = b"x" * 1024


def measure(
    url: str, count: int, *, exchange: str = "", routing_key: str = "", body: bytes = BODY
) -> float:
    """Publish ``count`` messages with up to WINDOW unconfirmed; return messages per second.

    By default to a fresh quorum queue of its own (deleted afterwards); with
    ``exchange`` and ``routing_key`` to an existing route instead.
    """
    queue = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
    target = (exchange, routing_key) if exchange else ("", queue)
    state = {"published": 0, "confirmed": 0, "started": 0.0, "finished": 0.0}
    properties = pika.BasicProperties(delivery_mode=2)

    def publish_more(channel: pika.channel.Channel) -> None:
        while state["published"] < count and state["published"] - state["confirmed"] < WINDOW:
            channel.basic_publish(*target, body, properties)
            state["published"] += 1

    def on_confirm(frame: pika.frame.Method) -> None:
        tag = frame.method.delivery_tag
        state["confirmed"] = tag if frame.method.multiple else max(state["confirmed"], tag)
        if state["confirmed"] >= count:
            state["finished"] = time.perf_counter()
            connection.close()
        else:
            publish_more(channel_ref[0])

    channel_ref: list[pika.channel.Channel] = []

    def on_declared(_frame: pika.frame.Method) -> None:
        channel = channel_ref[0]
        channel.confirm_delivery(on_confirm)
        state["started"] = time.perf_counter()
        publish_more(channel)

    def on_channel(channel: pika.channel.Channel) -> None:
        channel_ref.append(channel)
        channel.queue_declare(
            queue, durable=True, arguments={"x-queue-type": "quorum"}, callback=on_declared
        )

    connection = SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
        on_close_callback=lambda _conn, _reason: connection.ioloop.stop(),
    )
    connection.ioloop.start()
    cleanup = pika.BlockingConnection(pika.URLParameters(url))
    cleanup.channel().queue_delete(queue)
    cleanup.close()
    return count / (state["finished"] - state["started"])
