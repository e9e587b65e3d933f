"""``python -m api.cli``: the ``modelgate`` command line (the benchmark runs it so)."""

from api.cli import main

main()
