"""``python -m haqmoe``: the same CLI as the ``haqmoe`` command."""

from .cli.main import main

main()
