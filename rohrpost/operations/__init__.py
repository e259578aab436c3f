"""Operator tools: the dead-letter queue, cancel, pause and resume, resend from history.

Nothing an operator does may lose a mail: every move is publish-with-confirm first,
ack second (a crash in between leaves a duplicate, never a loss), and every action
is recorded in the history with who did it.
"""

from rohrpost.operations.deadletters import DeadLetterFilter, DeadLetterQueue
from rohrpost.operations.letter import DeadLetter
from rohrpost.operations.session import OperatorSession

__all__ = ["DeadLetter", "DeadLetterFilter", "DeadLetterQueue", "OperatorSession"]
