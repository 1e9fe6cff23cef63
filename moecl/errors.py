"""Errors meant for the person running moecl: each message names the file, field or value and what to do."""


class MoeclError(Exception):
    """Base of every error the command line prints as a message instead of a traceback."""


class DataError(MoeclError):
    """Bad or missing task data (shards, task.json, sequence files)."""


class CheckpointError(MoeclError):
    """A checkpoint that is missing, incomplete or does not match the run."""
