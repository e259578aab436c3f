"""The sub-commands of ``rohrpost``, one module per area."""
