"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class PipelineError(Exception):
    """A problem the user can fix (bad config, missing input, empty corpus)."""
