"""``python -m esper_assets.cli``: the ``esper`` command."""

from esper_assets.cli import main

main()
