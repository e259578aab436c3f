"""The ``rohrpost`` command line, the demo, and the local SMTP catcher."""
