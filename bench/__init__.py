"""Benchmarks: ``python -m bench submit|e2e|punctuality|scale|all [--mails N]``.

Not part of the test suite: each part measures on the real broker, the real
store and Postfix's smtp-sink, prints a table and, as its last line, one JSON
object with the figures.
"""
