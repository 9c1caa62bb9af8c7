"""Exceptions that the command line reports as one line with exit status 2."""


class CvddError(Exception):
    """Invalid user input or state, reported without a traceback.

    The message names the offending value and what to do about it.
    """


class ConfigError(CvddError, ValueError):
    """A config key, type or value that is not allowed."""


class DataError(CvddError):
    """A dataset that is missing, empty or malformed."""


class CheckpointError(CvddError):
    """A checkpoint that does not fit the dataset or model it is loaded for."""
