"""Errors raised by the layer store; messages are written for a person."""

from __future__ import annotations


class StoreError(Exception):
    """A store operation was refused or failed; the message says why."""


class MergeRefused(StoreError):
    """The upper uses overlay features an offline merge cannot reproduce."""
