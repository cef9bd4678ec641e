"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class MQExportError(Exception):
    """A problem with the user's input, stated with what to do about it."""
