"""Errors fedal raises. Each message names the problem and how to fix it."""
from __future__ import annotations


class FedalError(Exception):
    """Base class of every error fedal raises on purpose."""


class ConfigError(FedalError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class EmptyPoolError(FedalError, ValueError):
    """A query was asked of a pool that has no unlabeled sample left."""


class UnknownStrategyError(FedalError, KeyError):
    """A query strategy name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SampleStateError(ConfigError):
    """A sample is not in the state an action needs (e.g. answered twice: someone else was first)."""


class InvalidLabelError(FedalError, ValueError):
    """An oracle answered with a label outside the known classes."""


class UnknownSampleError(FedalError, KeyError):
    """A sample id is not in the pool (or not in the state asked for)."""

    def __str__(self) -> str:
        return str(self.args[0])


class DataFileError(FedalError, FileNotFoundError):
    """A data file is missing, truncated or not in the expected layout."""


class ProtocolError(FedalError, ValueError):
    """A message between a client and the server that is not what the wire contract defines
    (a key missing or malformed; see :mod:`fedal.flower.protocol`)."""


class OracleError(FedalError, RuntimeError):
    """An oracle failed to answer (timed out, errored)."""


class OutputError(FedalError, OSError):
    """A file or folder cannot be written (read-only, a file where a folder should be, no space left): the
    message names the path, the reason and what to give instead."""
