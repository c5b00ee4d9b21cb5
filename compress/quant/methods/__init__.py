"""Importing this package registers the built-in quantization methods (one module each)."""
from compress.quant.methods import ptq  # noqa: F401
from compress.quant.methods import qat  # noqa: F401
from compress.quant.methods import weight_only  # noqa: F401
from compress.quant.methods import binary  # noqa: F401
from compress.quant.methods import nbits  # noqa: F401
from compress.quant.methods.base import QUANT_METHODS, QuantContext, QuantizeConfig, handler_for, register_method  # noqa: F401
