"""Flax Linen models, built by name (see :mod:`fippure.models.registry`)."""

from fippure.models.layers import FEATURES, ComputeDtype
from fippure.models.preact_resnet import PreActResNet18
from fippure.models.registry import (
    MODELS,
    Variables,
    activations,
    count_params,
    create_model,
    forward,
    init_variables,
    model_fields,
    module_call_order,
    output_shape,
    penultimate_features,
    variables_must_fit,
    with_dtype,
)
from fippure.models.small_cnn import SmallCNN
from fippure.models.vgg import VGG
from fippure.models.vit import ViT

__all__ = [
    "FEATURES",
    "ComputeDtype",
    "MODELS",
    "VGG",
    "PreActResNet18",
    "SmallCNN",
    "Variables",
    "ViT",
    "activations",
    "count_params",
    "create_model",
    "forward",
    "init_variables",
    "model_fields",
    "module_call_order",
    "output_shape",
    "penultimate_features",
    "variables_must_fit",
    "with_dtype",
]
