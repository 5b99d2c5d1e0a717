"""Errors shared across LabVM modules."""


class LabVMError(Exception):
    """A refusal whose message is meant for the user."""
