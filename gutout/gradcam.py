"""Batched Grad-CAM with two fast paths and no side effects on the model.

- Closed form: when the head after the layer is global average pooling + a linear layer, Grad-CAM is
  CAM: relu(sum_k w[c, k] * A_k) up to a positive constant (dlogit_c / dA_k(i, j) = w[c, k] / (h * w)),
  which the per-map max normalisation removes. No backward at all. The head is *verified* on every
  batch by recomputing the logits from the captured activations, so a model whose forward does
  something else after the layer (DenseNet's ReLU, a non-linear classifier) falls back safely.
- Gradient path: the trunk runs under `no_grad`; the layer's hook swaps its output for a fresh leaf and
  switches autograd on, so gradients flow from the logits back to the layer and never through the trunk.

Maps are (B, h, w) float32 at the layer's resolution, ReLU'd, each divided by its own max (an all-zero
map stays zero and means "nothing to cut").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("label", "pred")


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """A module from a dotted name ("layer4", "features.7") or the module itself."""
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in model.named_children()]
        raise ValueError(
            f"{type(model).__name__} has no layer {layer!r}; its top-level children are {', '.join(names)}"
        ) from None


@torch.no_grad()
def default_layer(model: nn.Module, images: torch.Tensor) -> str:
    """The last top-level child whose output is a spatial feature map (the last convolutional stage)."""
    order: list[tuple[str, tuple]] = []
    hooks = [
        child.register_forward_hook(lambda _m, _i, out, name=name: order.append((name, tuple(out.shape))))
        for name, child in model.named_children()
    ]
    try:
        with preserved_modes(model):
            model.eval()
            model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    spatial = [name for name, shape in order if len(shape) == 4 and shape[-2] * shape[-1] > 1]
    if not spatial:
        raise ValueError(f"{type(model).__name__}: no top-level child outputs a feature map; pass layer=")
    return spatial[-1]


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit (the model can be half in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def normalise_maps(cams: torch.Tensor) -> torch.Tensor:
    """ReLU, then divide each map (B, h, w) by its own max; all-zero maps stay zero."""
    cams = cams.clamp_min(0)
    peak = cams.amax(dim=(-2, -1), keepdim=True)  # (B, 1, 1)
    return torch.where(peak > 0, cams / peak.clamp_min(torch.finfo(cams.dtype).tiny), 0.0)


def cam_from_activations(activations: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Closed-form CAM for a GAP + linear head: activations (B, K, h, w), weight (classes, K) -> (B, h, w)."""
    class_weights = weight.detach().float()[targets]  # (B, K)
    cams = torch.einsum("bk,bkhw->bhw", class_weights, activations.detach().float())  # (B, h, w)
    return normalise_maps(cams)


def find_linear_head(model: nn.Module, channels: int) -> nn.Linear | None:
    """The last nn.Linear taking `channels` features: the candidate head after global average pooling."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == channels]
    return linears[-1] if linears else None


def _head_matches(head: nn.Linear, activations: torch.Tensor, logits: torch.Tensor) -> bool:
    """Do the model's logits equal linear(GAP(activations))? Then the closed form is exact."""
    if logits.dim() != 2 or logits.shape[1] != head.out_features:
        return False
    pooled = activations.float().mean(dim=(-2, -1))  # (B, K)
    predicted = F.linear(pooled, head.weight.float(), None if head.bias is None else head.bias.float())
    scale = logits.detach().float().abs().amax().clamp_min(1.0)
    tolerance = 1e-4 if logits.dtype == torch.float32 else 2e-2  # AMP logits carry fp16 rounding
    return bool((predicted - logits.detach().float()).abs().amax() <= tolerance * scale)


class ActivationCapture:
    """Records a layer's output during a normal forward (harvest mode: CAMs at no extra forward).

    with ActivationCapture(model, "layer4") as capture:
        logits = model(images)          # the training forward, graph intact
    maps = cam_from_activations(capture.activations, model.fc.weight, labels)
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module, *, keep_graph: bool = False):
        self.module = resolve_layer(model, layer)
        self.keep_graph = keep_graph  # the activations stay in the forward's graph (for a loss on them)
        self.activations: torch.Tensor | None = None
        self._handle = None

    def _hook(self, _module, _inputs, output):
        # A copy: in-place ops after the layer (DenseNet's ReLU) must not change what we saw. Detached, unless a
        # loss is to be taken on it (a clone stays in the graph).
        self.activations = output.clone() if self.keep_graph else output.detach().clone()

    def __enter__(self) -> ActivationCapture:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class GradCAM:
    """Grad-CAM of `model` at `layer` for a batch: `GradCAM(model, "layer4")(images, labels)`.

    `layer` is a dotted name or a module (default: the last convolutional stage, found on first use);
    `target` "label" uses the given class indices, "pred" the argmax; `size=(H, W)` upsamples bilinearly.
    The model runs in eval mode for the call; its train/eval flags, `requires_grad` flags and `.grad`
    fields are unchanged afterwards, and no hook outlives the call (also on exceptions).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        target: str = "label",
        size: tuple[int, int] | None = None,
        closed_form: bool = True,  # allow the no-backward path where the head is verified GAP + linear
    ):
        if target not in TARGETS:
            raise ValueError(f"GradCAM target {target!r} is not one of {', '.join(TARGETS)}")
        self.model, self.target, self.size, self.closed_form = model, target, size, closed_form
        self.layer_name = layer if isinstance(layer, str) else None
        self._layer = resolve_layer(model, layer) if layer is not None else None
        self.last_path: str | None = None  # "closed-form" or "gradient": which path the last call took
        self.last_predictions: torch.Tensor | None = None  # (B,) the model's argmax classes in the last call
        self._head_is_linear: bool | None = None  # learnt on the first call, re-verified on every call

    def __enter__(self) -> GradCAM:
        return self

    def __exit__(self, *exc) -> None:
        pass  # hooks live only inside a call; nothing outlives it

    @property
    def layer(self) -> nn.Module | None:
        return self._layer

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self._layer is None:
            self.layer_name = default_layer(self.model, images)
            self._layer = resolve_layer(self.model, self.layer_name)
        if self.target == "label" and targets is None:
            raise ValueError("GradCAM(target='label') needs targets (class indices); or use target='pred'")
        with preserved_modes(self.model):
            self.model.eval()
            cams = self._cams(images, targets)
        if self.size is not None:
            cams = F.interpolate(cams[:, None], size=self.size, mode="bilinear", align_corners=False)[:, 0]
        return cams

    def _forward(self, images: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; returns (logits, activations). With `with_grad`, activations are a leaf that the
        logits depend on through the head only."""
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            if captured:
                raise RuntimeError("GradCAM: the layer ran twice in one forward; pass a layer that runs once")
            leaf = output.detach()
            if with_grad:
                torch.set_grad_enabled(True)  # from here to the logits only; no_grad's exit restores it
                leaf.requires_grad_(True)
            captured.append(leaf)
            # A clone, so in-place ops after the layer (DenseNet's ReLU) cannot touch the leaf.
            return leaf.clone()

        handle = self._layer.register_forward_hook(hook)
        try:
            with torch.no_grad():  # the trunk builds no graph
                logits = self.model(images)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"GradCAM: layer {self.layer_name or self._layer!r} did not run in the forward")
        return logits, captured[0]

    def _cams(self, images: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        try_closed_form = self.closed_form and self._head_is_linear is not False
        logits, activations = self._forward(images, with_grad=not try_closed_form)
        self.last_predictions = logits.detach().argmax(1)
        targets = logits.argmax(1) if self.target == "pred" else torch.as_tensor(targets, device=logits.device)
        targets = targets.long().view(-1)
        outside = ((targets < 0) | (targets >= logits.shape[-1])).nonzero()
        if len(outside):
            i = int(outside[0])
            raise ValueError(
                f"GradCAM: sample {i} asks for class {int(targets[i])}, but the model gives "
                f"{logits.shape[-1]} logits; its head must have one output per class"
            )
        if try_closed_form:
            head = find_linear_head(self.model, activations.shape[1])
            self._head_is_linear = head is not None and _head_matches(head, activations, logits)
            if self._head_is_linear:
                self.last_path = "closed-form"
                return cam_from_activations(activations, head.weight, targets)
            logits, activations = self._forward(images, with_grad=True)  # not GAP + linear: gradients
        self.last_path = "gradient"
        with torch.enable_grad():  # the caller may be under no_grad; the head's graph is already recorded
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, activations)  # (B, K, h, w), through the head only
        weights = grads.float().mean(dim=(-2, -1))  # (B, K): textbook Grad-CAM channel weights
        cams = torch.einsum("bk,bkhw->bhw", weights, activations.detach().float())
        return normalise_maps(cams)
