"""Importing this package registers every stage (one module per stage)."""
from compress.stages import train  # noqa: F401
from compress.stages import distill  # noqa: F401
from compress.stages import prune  # noqa: F401
from compress.stages import export  # noqa: F401
from compress.stages import quantize  # noqa: F401
from compress.stages import bake  # noqa: F401
from compress.stages import cluster  # noqa: F401
from compress.stages import encode  # noqa: F401
