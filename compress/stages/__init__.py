"""Importing this package registers every stage (one module per stage)."""
from compress.stages import train  # noqa: F401
