"""The contract producer and consumers agree on: container, events, settings, topology."""
