"""The processes that consume the queues: the send worker and its supervisor."""
