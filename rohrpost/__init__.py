"""rohrpost: a mail queue for RabbitMQ.

``rohrpost.producer`` is the client services use to submit mails (the base install);
``rohrpost.consumer`` holds the send worker and history consumer,
``rohrpost.operations`` the operator tools and ``rohrpost.shared`` the contract
between them. The processes need ``pip install 'rohrpost[server]'``.
"""

import logging

# A library's loggers stay silent until the application configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())
