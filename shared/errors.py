"""Every error rohrpost raises, under one root.

    RohrpostError
    ├── ConfigError                 the configuration is invalid; names the key
    ├── ContainerError              a mail container is invalid; names the field
    ├── UnknownRoute                tenant/app is not configured, or disabled
    ├── DuplicateMail               a mail id that was submitted before
    ├── OperatorError               an operator action cannot be done as asked
    ├── BrokerError                 RabbitMQ did not do what we asked
    │   ├── BrokerUnavailable       cannot connect (or lost the connection)
    │   ├── TopologyMissing         an exchange or queue we need does not exist
    │   ├── TopologyConflict        a queue exists with other arguments
    │   └── NotConfirmed            a publish was nacked, returned or timed out
    │       └── Unroutable          no queue is bound for it (returned)
    ├── StoreError                  the history store failed
    │   └── StoreUnavailable        cannot reach it (down, locked, read-only): try later
    ├── RenderError                 a template is missing, broken or needs data it lacks
    ├── UnencodableMail             the mail cannot be written for its SMTP server: a
    │                               character no encoding carries, or an address that
    │                               needs SMTPUTF8 the server does not offer
    └── DeliveryError               the SMTP server did not take the mail
        ├── TransientDeliveryError  4xx, refused connection, timeout: retry later
        │   └── ThrottledDeliveryError  421/451/454 "rate limit": too fast, delay
        └── PermanentDeliveryError  5xx: retrying will not help

Third-party exceptions (pika, smtplib, jinja2, pydantic) are translated where they
occur, with ``raise Ours(...) from exc``.
"""

from __future__ import annotations

import uuid


class RohrpostError(Exception):
    """Root of every error rohrpost raises."""


class ConfigError(RohrpostError):
    """The configuration is invalid or inconsistent."""


class ContainerError(RohrpostError, ValueError):
    """A mail container failed validation; the message names the field."""


class UnknownRoute(RohrpostError):
    """A mail names a tenant/app that is not configured or not enabled."""


class DuplicateMail(RohrpostError):
    """A mail id was submitted before; this submit published nothing.

    ``same_content`` tells a harmless repetition (a client retrying) from a second,
    different mail under the same id (refused; the first one stands).
    """

    def __init__(self, mail_id: uuid.UUID, *, same_content: bool) -> None:
        if same_content:
            text = f"mail {mail_id} was submitted before with the same content; not submitted again"
        else:
            text = (
                f"mail {mail_id}: this id was submitted before for a different mail; "
                "not submitted (the first mail stands; give the new one its own id)"
            )
        super().__init__(text)
        self.mail_id = mail_id
        self.same_content = same_content


class OperatorError(RohrpostError):
    """An operator action cannot be carried out as asked (nothing was changed)."""


class BrokerError(RohrpostError):
    """RabbitMQ refused or failed an operation."""


class BrokerUnavailable(BrokerError):
    """No connection to RabbitMQ could be made, or it was lost."""


class TopologyMissing(BrokerError):
    """An exchange or queue rohrpost needs does not exist on the broker."""


class TopologyConflict(BrokerError):
    """A queue or exchange exists with arguments different from the configuration."""


class NotConfirmed(BrokerError):
    """The broker did not confirm a publish: nacked, unroutable, or no answer in time."""


class Unroutable(NotConfirmed):
    """The broker returned a publish: no queue is bound for its routing key."""


class StoreError(RohrpostError):
    """The history store refused or failed an operation."""


class StoreUnavailable(StoreError):
    """The history store cannot be reached or written right now; retrying may help."""


class RenderError(RohrpostError):
    """A template could not be rendered."""


class UnencodableMail(RohrpostError):
    """The mail cannot be put into SMTP as it is; retrying will not help."""


class DeliveryError(RohrpostError):
    """The SMTP server did not accept the mail.

    ``code`` is the SMTP reply code when the server gave one, else ``None``.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientDeliveryError(DeliveryError):
    """A failure that may pass: 4xx reply, refused connection, timeout."""


class ThrottledDeliveryError(TransientDeliveryError):
    """The server says the client sends too fast: slow down and try again, not an attempt."""


class PermanentDeliveryError(DeliveryError):
    """A failure that will not pass by retrying: 5xx reply."""
