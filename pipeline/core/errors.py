"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class PipelineError(Exception):
    """A problem the user can fix (bad config, missing input, empty corpus): exit code 2."""

    exit_code = 2

    def __init__(self, message: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class TrainingStopped(PipelineError):
    """A training run stopped by a signal after saving its checkpoint: exit 128 + the signal
    number (143 SIGTERM, 130 SIGINT, 138 SIGUSR1); the same command resumes it."""

    exit_code = 143


class TrainingFailed(PipelineError):
    """Training or its export failed; the run's checkpoints are kept: exit code 1."""

    exit_code = 1
