"""``python -m unimedvl.cli``: the ``unimedvl`` command."""

from . import main

main()
