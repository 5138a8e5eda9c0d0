"""One exception type for everything the user can fix; the CLI prints it as one line."""


class HaqmoeError(Exception):
    """A problem with the user's input or environment (bad path, unsupported model, short text).

    The CLI prints ``haqmoe: error: <message>`` and exits with ``exit_code`` (2 = bad input).
    Anything else that escapes is a bug: exit code 1 and a traceback under ``--debug``.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
