"""Model zoo: small reference networks for 28x28 inputs, built by name.

Every model is made of ordinary ``torch.nn`` modules and plain tensor ops so that secateur's
dependency-graph tracer sees standard operations. Importing this package registers all families.

    >>> from secateur.zoo import create_model
    >>> model = create_model("resnet20", num_classes=10, in_chans=1)
"""

from secateur.zoo import lenet, mobilenetv2, resnet, vgg, vit  # noqa: F401  (registers the models)
from secateur.zoo.lenet import LeNet5
from secateur.zoo.mobilenetv2 import InvertedResidual, MobileNetV2
from secateur.zoo.registry import create_model, list_models, rebuild_model, register_model
from secateur.zoo.resnet import BasicBlock, CifarResNet
from secateur.zoo.vgg import VGG
from secateur.zoo.vit import Attention, Block, VisionTransformer

__all__ = [
    "Attention",
    "BasicBlock",
    "Block",
    "CifarResNet",
    "InvertedResidual",
    "LeNet5",
    "MobileNetV2",
    "VGG",
    "VisionTransformer",
    "create_model",
    "list_models",
    "rebuild_model",
    "register_model",
]
