"""``python -m rohrpost`` is the ``rohrpost`` command."""

from rohrpost.cli import main

main()
