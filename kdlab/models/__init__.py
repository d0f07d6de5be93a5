"""The model zoo (registered under kind "model") and feature taps.

Importing this package registers every family: ``mlp``, ``cnn1d``, the CIFAR
ResNets (``resnet20``, ``resnet8x4``, ..., ``resnet_cifar``), wide ResNets
(``wrn``, ``wrn_40_2``, ...), ``mobilenetv2``, ``vit_tiny``, and the text encoders
``bert_encoder``, ``minilm`` (pretrained) and ``hf_encoder`` (Hugging Face) on token ids, and the adapters
``timm`` / ``torchvision`` (``model: timm:resnet18``; the vision extra). Every model
normalises its [0, 1] input inside ``forward`` and names its stages in
``model.feature_stages`` (the last, ``pool``, is the penultimate feature vector).
"""
from kdlab.models import cnn1d, encoder, hf_encoder, mlp, mobilenetv2, resnet_cifar, vision_zoo, vit, wrn  # noqa: F401  (registers the models)
from kdlab.models.ensemble import TeacherEnsemble
from kdlab.models.taps import Taps, parameter_count, tap_shapes, taps, valid_tap_names

__all__ = ["TeacherEnsemble", "Taps", "taps", "tap_shapes", "parameter_count", "valid_tap_names"]
