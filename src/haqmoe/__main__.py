"""``python -m haqmoe``: the same CLI as the ``haqmoe`` command."""

from .cli.main import main

if __name__ == "__main__":  # importing this module (tools that walk the package) runs nothing
    main()
