"""The one exception type that means "the user asked for something we cannot do"."""


class LorafitError(Exception):
    """A problem with the user's input (recipe, paths, data, adapter files).

    The CLI prints it as a one-line message and exits with code 2, without a traceback.
    Anything else that escapes is a bug and keeps its traceback.
    """

    exit_code = 2


class TrainingInterrupted(LorafitError):
    """SIGINT/SIGTERM arrived: the step finished, a checkpoint was written, the run stops."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
