"""Models by name (``create_model``), in the style of timm's registry."""
from compress.models.registry import MODELS, ModelSpec, create_model, parse_model_spec, register_model
from compress.models import builtin as _builtin  # noqa: F401  (registers mlp, lenet5, smallcnn, torchvision)
from compress.models import kernelnet as _kernelnet  # noqa: F401  (registers kernelnet_autoencoder, autoencoder)
from compress.models import resnet_small as _resnet_small  # noqa: F401  (registers small_resnet)
from compress.models import external as _external  # noqa: F401  (torchvision:, timm:, hf: prefixes; after builtin)

__all__ = ["MODELS", "ModelSpec", "create_model", "parse_model_spec", "register_model"]
