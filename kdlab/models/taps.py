"""Feature taps: capture intermediate outputs of named submodules with forward hooks.

    with Taps(student, ["stage2", "pool"]) as feats:
        logits = student(x)
        hint = feats["stage2"]          # (N, C, H, W), still in the autograd graph

A name is any module path accepted by ``model.get_submodule`` (``"stage2"``,
``"stage2.0.conv1"``); zoo models publish their top-level ones as
``model.feature_stages``. Each forward of the model replaces what was captured,
so no stale tensor from an earlier batch outlives the next forward. A name ending in ``:input``
captures the module's (first) input instead of its output, e.g. ``"stage1.0.relu2:input"``, the
pre-activation a ReLU receives (OFD distils those).
"""
import difflib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdlab.errors import KdlabError

INPUT_SUFFIX = ":input"  # tap the module's input rather than its output


def valid_tap_names(model: nn.Module) -> list[str]:
    """Names ``Taps`` accepts for ``model``: its ``feature_stages`` first, then every module path."""
    stages = list(getattr(model, "feature_stages", ()))
    paths = [name for name, _ in model.named_modules() if name and name not in stages]
    return stages + paths


def _unknown_tap_message(model: nn.Module, name: str) -> str:
    stages = list(getattr(model, "feature_stages", ()))
    paths = [path for path, _ in model.named_modules() if path and path not in stages]
    close = difflib.get_close_matches(name, stages + paths, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
    stage_text = f"feature stages: {', '.join(stages)}; " if stages else ""
    return (f"unknown tap {name!r} for {type(model).__name__}; {hint}{stage_text}"
            f"other module paths: {shown or '(none)'} (kdlab.models.valid_tap_names lists all)")


class Taps:
    """Forward hooks capturing the outputs of ``names`` (module paths of ``model``).

    ``taps[name]`` is the output of that module in the latest forward of
    ``model`` (the first element if the module returns a tuple or list); a
    module called several times in one forward keeps its last output. With
    ``detach=True`` the captured tensors are detached (teacher features); else
    they keep their graph so losses on them train the student. A context
    manager; ``close()`` (also called by ``__exit__``) removes every hook.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, detach: bool = False):
        if isinstance(names, str):
            names = [names]
        self.names: tuple[str, ...] = tuple(dict.fromkeys(names))  # de-duplicated, order kept
        self.detach = detach
        self._model = model
        self._captured: dict[str, Tensor] = {}
        modules = {}
        for name in self.names:  # resolve every name before hooking anything: no half-installed taps
            try:
                path = name[:-len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
                modules[name] = model.get_submodule(path)
            except AttributeError:
                raise KdlabError(_unknown_tap_message(model, name)) from None
        # Clearing at the start of each forward of the whole model guarantees that a
        # module skipped in this forward does not hand back last batch's tensor.
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._clear_hook)]
        for name, module in modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _clear_hook(self, module: nn.Module, args: tuple) -> None:
        self._captured.clear()

    def _make_hook(self, name: str):
        captured, detach = self._captured, self.detach
        wants_input = name.endswith(INPUT_SUFFIX)

        def hook(module: nn.Module, args: tuple, output) -> None:
            if wants_input:
                output = args[0]
            if isinstance(output, (tuple, list)):
                output = output[0]
            captured[name] = output.detach() if detach else output

        return hook

    def __getitem__(self, name: str) -> Tensor:
        """Output of ``name`` in the latest forward; ``KdlabError`` if not tapped or not run yet."""
        try:
            return self._captured[name]
        except KeyError:
            if name not in self.names:
                raise KdlabError(f"tap {name!r} was not requested; tapped: {', '.join(self.names) or '(none)'}; "
                                 "add it to the names given to Taps") from None
            raise KdlabError(f"tap {name!r} has no output yet: run a forward pass of the model first "
                             "(or the module is not used by the model's forward)") from None

    def __contains__(self, name: object) -> bool:
        return name in self._captured

    def __len__(self) -> int:
        return len(self._captured)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ordered())

    def _ordered(self) -> dict[str, Tensor]:
        """Captured outputs in the order of ``names`` (those run in the latest forward)."""
        return {name: self._captured[name] for name in self.names if name in self._captured}

    def items(self):
        """``(name, tensor)`` pairs of the latest forward, in the order of ``names``."""
        return self._ordered().items()

    @property
    def captured(self) -> dict[str, Tensor]:
        """A new dict ``{name: tensor}`` of the latest forward, in the order of ``names``."""
        return self._ordered()

    def clear(self) -> None:
        """Drop the captured tensors (frees their memory and autograd graphs); hooks stay."""
        self._captured.clear()

    def close(self) -> None:
        """Remove all hooks and drop the captured tensors; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def __enter__(self) -> "Taps":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if not self._handles else f"{len(self._captured)} captured"
        return f"Taps({type(self._model).__name__}, {list(self.names)}, detach={self.detach}, {state})"


def taps(model: nn.Module, names: Sequence[str], *, detach: bool = False) -> Taps:
    """Hook ``names`` of ``model``; see ``Taps``."""
    return Taps(model, names, detach=detach)


def tap_shapes(model: nn.Module, names: Sequence[str], example_input: Tensor) -> dict[str, tuple[int, ...]]:
    """Shapes (batch dim included) of the tapped outputs for ``example_input``, e.g. for a dry run.

    Runs one forward under ``torch.no_grad()`` in eval mode (so BatchNorm
    statistics are untouched), then restores each submodule's own train/eval
    flag. Names not reached by the forward are left out of the result.
    """
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), Taps(model, names, detach=True) as tapped:
            model(example_input)
            return {name: tuple(tensor.shape) for name, tensor in tapped.items()}
    finally:
        for module, training in modes.items():
            module.training = training


def parameter_count(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
