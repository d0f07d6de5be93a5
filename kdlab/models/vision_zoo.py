"""timm and torchvision image classifiers as kdlab models: ``model: timm:resnet18``, ``model: torchvision:resnet50``.

The config's ``LIB:NAME`` is short for ``model: LIB, name: NAME`` (``kdlab.config.entries``). Both entries build
the library's model with the dataset's ``num_classes`` (timm also takes its ``in_chans``) and wrap it:

* ``normalize`` (``kdlab.models.common.Normalize``) maps kdlab's [0, 1] inputs to what the weights expect:
  with weights loaded (``pretrained`` or ``weights_file``) the pretrained config's mean/std (timm's
  ``pretrained_cfg``, torchvision's weights transforms; ImageNet's without them), otherwise the dataset's,
  as every kdlab model (``normalize: pretrained | data`` forces either);
* ``net`` is the library's model itself, so its module paths stay as the library names them behind the
  prefix ``net.`` (``net.layer3``, ``net.stages.1``): any of them is a tap;
* ``feature_stages``: ``net.`` + the modules of timm's ``feature_info`` (``act1``, ``layer1`` ... ``layer4`` for
  a ResNet) or torchvision's stages (``layer1..4``, else the children of ``features``), then ``pool``: the
  classifier's input, the penultimate vector ``(N, D)``, as every kdlab model's last stage.

``pretrained: true`` reads the library's local cache only (Hugging Face hub cache, ``torch.hub`` checkpoints);
``weights_file: PATH`` a ``.pth``/``.safetensors`` state dict of the library's model (a classifier of another
class count is left new). A teacher with weights is fine-tuned by its recipe, or used as it is with
``as_is: true`` (its classifier must then fit the data's classes). Needs the ``vision`` extra.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kdlab.config.checks import config_rule
from kdlab.errors import KdlabError
from kdlab.models.common import Normalize, check_common
from kdlab.registry import register

LIBRARIES = ("timm", "torchvision")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INSTALL = ("pip install 'kdlab[vision]' (torchvision must be the build made for your torch, e.g. torch==2.14.1 "
           "with torchvision==0.29.1; a mismatched pair fails with 'operator torchvision::nms does not exist')")
NORMALIZE = ("auto", "pretrained", "data")


def import_library(lib: str, key: str = "student.model") -> Any:
    """``timm`` or ``torchvision``, or one line naming the extra and the torch pairing."""
    try:
        if lib == "timm":
            import timm
            return timm
        import torchvision.models
        return torchvision
    except (ImportError, RuntimeError, OSError) as exc:  # a mismatched torchvision raises RuntimeError at import
        raise KdlabError(f"{key}: {lib} models need {lib} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                         f"{INSTALL}") from None


def check_name(lib: str, name: Any, key: str = "student.model") -> None:
    """Refuse a missing or unknown architecture name with the library's close matches."""
    if not isinstance(name, str) or not name:
        raise KdlabError(f"{key}: name the {lib} architecture, e.g. model: {lib}:resnet18")
    module = import_library(lib, key)
    if lib == "timm":
        known = module.list_models()
        base = name.split(".", 1)[0]  # resnet18.a1_in1k: architecture + pretrained tag
        ok = base in known
    else:
        known = module.models.list_models()
        ok = name in known
    if not ok:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        listing = "timm.list_models()" if lib == "timm" else "torchvision.models.list_models()"
        raise KdlabError(f"{key}: unknown {lib} model {name!r}; {hint}({len(known)} names in {listing})")


class _Probe(nn.Module):
    """Identity module whose output a tap can capture; fed by a hook on the classifier (``capture``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def capture(self, module: nn.Module, args: tuple) -> None:
        # A bound method, not a closure: deepcopy (teacher bf16 copies) rebinds it to the copy's probe.
        self(args[0])


class VisionZooModel(nn.Module):
    """``normalize -> net`` (the library's model unchanged); ``pool`` taps the classifier's input."""

    def __init__(self, net: nn.Module, classifier: nn.Module, *, input_shape: tuple[int, ...],
                 mean: tuple[float, ...], std: tuple[float, ...], stages: list[str], source: str):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.source = source  # "timm:resnet18", for messages
        self.normalize = Normalize(mean, std, input_shape=self.input_shape)
        self.net = net
        self.pool = _Probe()
        classifier.register_forward_pre_hook(self.pool.capture)
        self.feature_stages = tuple(f"net.{s}" for s in stages) + ("pool",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, C, H, W)`` in [0, 1]."""
        out = self.net(self.normalize(x))
        return out.logits if hasattr(out, "logits") else out  # torchvision's GoogLeNet/Inception in train mode


def _channel_stats(values, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    return (sum(values) / len(values),) * channels  # e.g. a grey-scale input to an RGB-pretrained model


def _read_state_dict(path: str, key: str) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise KdlabError(f"{key}: weights file {file} does not exist; give the path of a local .pth or "
                         ".safetensors state dict")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise KdlabError(f"{key}: cannot read weights file {file} ({type(exc).__name__}); give a .pth or "
                         ".safetensors state dict") from None
    for wrapper_key in ("state_dict", "model"):  # common checkpoint layouts {"state_dict": {...}}
        state = state[wrapper_key] if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdlabError(f"{key}: {file} holds no state dict of tensors; save one with torch.save(model.state_dict())")
    if state and all(k.startswith("net.") for k in state if not k.startswith("normalize.")):  # a kdlab wrapper's
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    return state


def load_weights_file(net: nn.Module, classifier_prefix: str, path: str, key: str, as_is: bool = False) -> None:
    """Load a local state dict into ``net``; classifier tensors of another shape are skipped (left new), unless
    the model is to be used as it is (``as_is``): then its head must fit the data."""
    state = _read_state_dict(path, key)
    own = net.state_dict()
    skipped = [k for k, v in state.items() if k.startswith(classifier_prefix) and k in own and own[k].shape != v.shape]
    if skipped and as_is:
        raise KdlabError(f"{key}: the classifier in {path} ({skipped[0]}: {tuple(state[skipped[0]].shape)}) does not "
                         f"fit this dataset's classes ({tuple(own[skipped[0]].shape)}); drop as_is to fine-tune it")
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and k not in skipped and not k.startswith(classifier_prefix)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                 else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}")
        raise KdlabError(f"{key}: {path} does not fit this architecture ({first}); give a state dict of the same "
                         "model")
    net.load_state_dict(state, strict=False)


def _cached_file(url: str) -> Optional[Path]:  # where torch.hub.load_state_dict_from_url keeps a download
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
    return file if file.is_file() else None


def _timm_local_weights(timm: Any, name: str, key: str) -> str:
    """The local file of timm's pretrained weights for ``name``, or one line on how to get it (no download)."""
    found_cfg = timm.models.get_pretrained_cfg(name)
    cfg = found_cfg.to_dict() if found_cfg is not None else {}
    hub_id = cfg.get("hf_hub_id")
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return cfg["file"]
    if hub_id:
        from huggingface_hub import try_to_load_from_cache
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return found
    if cfg.get("url") and _cached_file(cfg["url"]):
        return str(_cached_file(cfg["url"]))
    where = f"Hugging Face hub {hub_id}" if hub_id else cfg.get("url") or "no published weights"
    raise KdlabError(f"{key}: pretrained weights of timm:{name} are not in the local cache ({where}); kdlab does "
                     f"not download: fetch them once (python -c \"import timm; timm.create_model('{name}', "
                     "pretrained=True)\") or give weights_file: PATH")


def _stages_found(net: nn.Module, names: list[str]) -> list[str]:
    modules = dict(net.named_modules())
    return [n for n in names if n in modules]


def _pick_stats(normalize: str, loaded: bool, pretrained_stats, data_stats, channels: int):
    if normalize not in NORMALIZE:
        raise KdlabError(f"normalize: {normalize!r} is not one of {', '.join(NORMALIZE)}; auto uses the pretrained "
                         "statistics when weights are loaded, else the dataset's")
    if normalize == "pretrained" or (normalize == "auto" and loaded):
        return tuple(_channel_stats(s, channels) for s in pretrained_stats)
    return data_stats


@register("model", "timm")
def timm_model(*, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...] = (0.5,),
               std: tuple[float, ...] = (0.5,), name: Optional[str] = None, pretrained: bool = False,
               weights_file: Optional[str] = None, normalize: str = "auto", as_is: bool = False,
               model_args: Optional[dict] = None) -> VisionZooModel:
    """A timm image model (``model: timm:NAME``), local pretrained weights only, taps from its ``feature_info``."""
    key = "model: timm"
    timm = import_library("timm", key)
    check_name("timm", name, key)
    shape, data_mean, data_std = check_common(f"timm:{name}", input_shape=input_shape, num_classes=num_classes,
                                              mean=mean, std=std, ranks=(3,))
    args = dict(model_args or {})
    if pretrained:  # timm reads the local file itself (in_chans and class-count changes adapted), never the network
        args["pretrained_cfg_overlay"] = {"file": _timm_local_weights(timm, name, key)}
    net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=shape[0], **args)
    classifier = net.get_classifier()
    prefix = next((n + "." for n, m in net.named_modules() if m is classifier), "")
    trained_classes = (getattr(net, "pretrained_cfg", {}) or {}).get("num_classes")
    if as_is and pretrained and weights_file is None and trained_classes != num_classes:  # timm re-initialised it
        raise KdlabError(f"{key}: timm:{name}'s pretrained head predicts {trained_classes} classes, the dataset "
                         f"{num_classes}; drop as_is to fine-tune it, or give a weights_file trained on these classes")
    if weights_file is not None:
        load_weights_file(net, prefix, weights_file, f"{key} weights_file", as_is=as_is)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    stats = _pick_stats(normalize, pretrained or weights_file is not None,
                        (cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)), (data_mean, data_std), shape[0])
    info = getattr(net, "feature_info", None)
    stages = _stages_found(net, [f["module"] for f in info] if info is not None else [])
    return VisionZooModel(net, classifier, input_shape=shape, mean=stats[0], std=stats[1], stages=stages,
                          source=f"timm:{name}")


def _torchvision_stages(net: nn.Module) -> list[str]:
    names = [f"layer{i}" for i in range(1, 5)]
    if all(hasattr(net, n) for n in names):  # ResNet, ResNeXt, Wide ResNet
        return names
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential):  # MobileNet, EfficientNet, ConvNeXt, VGG, DenseNet, ...
        return [f"features.{n}" for n, _ in features.named_children()]
    return [n for n, _ in net.named_children()][:-1]


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdlabError(f"model: torchvision: {type(net).__name__} has no Linear classifier; pick a classification "
                         "model (torchvision.models.list_models(module=torchvision.models))")
    return linears[-1]


@register("model", "torchvision")
def torchvision_model(*, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...] = (0.5,),
                      std: tuple[float, ...] = (0.5,), name: Optional[str] = None, pretrained: bool = False,
                      weights_file: Optional[str] = None, normalize: str = "auto", as_is: bool = False,
                      model_args: Optional[dict] = None) -> VisionZooModel:
    """A torchvision classifier (``model: torchvision:NAME``), local pretrained weights only, taps on its stages."""
    key = "model: torchvision"
    tv = import_library("torchvision", key)
    check_name("torchvision", name, key)
    shape, data_mean, data_std = check_common(f"torchvision:{name}", input_shape=input_shape,
                                              num_classes=num_classes, mean=mean, std=std, ranks=(3,))
    if shape[0] != 3:
        raise KdlabError(f"model: torchvision:{name} takes 3-channel images but the dataset has {shape[0]}; use a "
                         "timm model (in_chans follows the data) or an RGB dataset")
    args = dict(model_args or {})
    weights = tv.models.get_model_weights(name).DEFAULT if pretrained else None
    if weights is not None and _cached_file(weights.url) is None:
        raise KdlabError(f"{key}: pretrained weights of torchvision:{name} ({os.path.basename(weights.url)}) are "
                         f"not in {Path(torch.hub.get_dir()) / 'checkpoints'}; kdlab does not download: fetch them "
                         "once with torchvision, or give weights_file: PATH")
    # With weights it is built with their head, replaced below when the class count differs.
    net = tv.models.get_model(name, weights=weights, **args, **({} if weights else {"num_classes": num_classes}))
    head_name, head = _last_linear(net)
    if head.out_features != num_classes:
        if as_is and weights_file is None:
            raise KdlabError(f"{key}: torchvision:{name}'s pretrained head predicts {head.out_features} classes, the "
                             f"dataset {num_classes}; drop as_is to fine-tune it, or give a weights_file trained on "
                             "these classes")
        head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        net.set_submodule(head_name, head)
    if weights_file is not None:
        load_weights_file(net, head_name + ".", weights_file, f"{key} weights_file", as_is=as_is)
    transforms = weights.transforms() if weights is not None else None
    pretrained_stats = (getattr(transforms, "mean", IMAGENET_MEAN), getattr(transforms, "std", IMAGENET_STD))
    stats = _pick_stats(normalize, pretrained or weights_file is not None, pretrained_stats, (data_mean, data_std),
                        shape[0])
    return VisionZooModel(net, head, input_shape=shape, mean=stats[0], std=stats[1],
                          stages=_stages_found(net, _torchvision_stages(net)), source=f"torchvision:{name}")


# ``as_is: true`` with loaded weights (pretrained or weights_file): a teacher used as it is, with no recipe run
# (kdlab.config.entries.pretrained_teacher); otherwise a teacher is trained (fine-tuned) by its recipe.
timm_model.pretrained = torchvision_model.pretrained = lambda options: bool(
    options.get("as_is") and (options.get("pretrained") or options.get("weights_file")))


def _model_sections(cfg: Any):
    teacher = getattr(cfg, "teacher", None)
    yield from (("student", getattr(cfg, "student", None)), ("teacher", teacher))
    for nested in ("assistants", "members"):
        for i, section in enumerate(getattr(teacher, nested, None) or []):
            yield f"teacher.{nested}[{i}]", section


@config_rule
def check_vision_models(cfg: Any, errors: list[str]) -> None:
    """Before any work: the library is importable, the name exists, a weights file is there."""
    for path, section in _model_sections(cfg):
        lib = getattr(section, "model", None)
        options = getattr(section, "options", None)
        if lib not in LIBRARIES or not isinstance(options, dict):
            continue
        try:
            check_name(lib, options.get("name"), f"{path}.model")
        except KdlabError as exc:
            errors.append(str(exc))
        if options.get("normalize", "auto") not in NORMALIZE:
            errors.append(f"{path}.normalize: {options['normalize']!r} is not one of {', '.join(NORMALIZE)}")
        if options.get("as_is") and not (options.get("pretrained") or options.get("weights_file")):
            errors.append(f"{path}.as_is: a model used as it is needs its weights: set pretrained: true or "
                          "weights_file")
        elif path == "teacher" and options.get("as_is") and getattr(section, "train", None) is not None:
            errors.append("teacher.train: a teacher with as_is: true is used as it is, not trained; drop teacher.train "
                          "or as_is")
        weights_file = options.get("weights_file")
        if isinstance(weights_file, str) and not Path(weights_file).expanduser().is_file():
            errors.append(f"{path}.weights_file: weights file {Path(weights_file).expanduser()} does not exist; give "
                          "the path of a local .pth or .safetensors state dict")
