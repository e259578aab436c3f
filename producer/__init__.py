"""The client services use to submit mails."""

from rohrpost.producer.client import Producer, SubmitManyError

__all__ = ["Producer", "SubmitManyError"]
