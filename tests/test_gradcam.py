import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from gutout import ActivationCapture, GradCAM, cam_from_activations
from gutout.gradcam import normalise_maps
from gutout.train.models import resnet18_cifar, small_resnet


def _pooled(x):
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# Each model with its Grad-CAM layer and its head written out by hand (the layer's output -> logits),
# so the reference below shares no hook trick with the code under test.
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=20), "layer4", lambda m, a: m.fc(_pooled(a)), 96),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=20), "layer4", lambda m, a: m.fc(_pooled(a)), 64),
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=20),
        "features",
        lambda m, a: m.classifier(_pooled(a)),
        96,
    ),
    "densenet121": (  # DenseNet applies F.relu(inplace=True) to the output of `features`
        lambda: torchvision.models.densenet121(num_classes=20),
        "features",
        lambda m, a: m.classifier(_pooled(F.relu(a))),
        64,
    ),
    "small_resnet": (lambda: small_resnet(10, 1), "layer3", lambda m, a: m.fc(_pooled(a)), 28),
    "resnet18_cifar": (lambda: resnet18_cifar(10, 3), "layer4", lambda m, a: m.fc(_pooled(a)), 32),
}


def build(name, seed=0):
    make, layer, head, size = MODELS[name]
    torch.manual_seed(seed)
    model = make().eval()
    channels = 1 if name == "small_resnet" else 3
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return model, layer, head, x


def reference_gradcam(model, layer, head, x, targets):
    """Textbook Grad-CAM with plain autograd: weights = spatial mean of d(target logit)/d(activation)."""
    store = {}

    def keep_a_copy(module, inputs, output):  # returns None: the model's own output flows on untouched
        store["a"] = output.clone()

    handle = model.get_submodule(layer).register_forward_hook(keep_a_copy)
    with torch.no_grad():
        model(x)
    handle.remove()
    a = store["a"].detach().requires_grad_(True)
    logits = head(model, a)
    (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), a)
    cams = F.relu((grads.mean((2, 3))[:, :, None, None] * a).sum(1)).detach()
    peak = cams.amax((1, 2), keepdim=True)
    return torch.where(peak > 0, cams / peak, 0.0)


def minmax(maps):
    lo = maps.amin((1, 2), keepdim=True)
    return (maps - lo) / (1e-7 + (maps - lo).amax((1, 2), keepdim=True))


@pytest.mark.parametrize("name", list(MODELS))
def test_equals_textbook_gradcam(name):
    model, layer, head, x = build(name)
    targets = torch.tensor([3, 7, 0])
    ours = GradCAM(model, layer)(x, targets)
    ref = reference_gradcam(model, layer, head, x, targets)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_small", "small_resnet", "resnet18_cifar"])
def test_equals_pytorch_grad_cam(name):
    # densenet121 is left out here: pytorch-grad-cam stores the layer output, which DenseNet's in-place
    # ReLU then overwrites, so that oracle is wrong there; the autograd reference above covers it.
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class LayerResolutionGradCAM(pgc.GradCAM):
        def get_target_width_height(self, input_tensor):
            return None  # keep maps at the layer's resolution (min-max scaled, not resized)

    model, layer, _, x = build(name)
    targets = [3, 7, 0]
    with LayerResolutionGradCAM(model, [model.get_submodule(layer)]) as oracle:
        theirs = torch.from_numpy(oracle(x, [ClassifierOutputTarget(t) for t in targets]))
    ours = GradCAM(model, layer)(x, torch.tensor(targets))
    assert (minmax(ours) - theirs).abs().max() < 1e-3


def test_closed_form_used_where_head_is_gap_linear_and_not_elsewhere():
    for name, path in [
        ("resnet18", "closed-form"),
        ("small_resnet", "closed-form"),
        ("densenet121", "gradient"),
        ("mobilenet_v3_small", "gradient"),
    ]:
        model, layer, _, x = build(name)
        cam = GradCAM(model, layer)
        cam(x, torch.tensor([1, 2, 3]))
        assert cam.last_path == path, name
    model, layer, head, x = build("resnet18")
    forced = GradCAM(model, layer, closed_form=False)
    maps = forced(x, torch.tensor([1, 2, 3]))
    assert forced.last_path == "gradient"
    assert (maps - GradCAM(model, layer)(x, torch.tensor([1, 2, 3]))).abs().max() < 1e-4


def test_a_head_that_looks_linear_but_is_not_falls_back_to_gradients():
    class Tricky(nn.Module):  # GAP + Linear modules, but the forward squares the features first
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            a = self.body(x)
            return self.fc(_pooled(a * a))

    torch.manual_seed(0)
    model = Tricky().eval()
    x = torch.randn(2, 3, 10, 10)
    cam = GradCAM(model, "body")
    maps = cam(x, torch.tensor([0, 4]))
    assert cam.last_path == "gradient"
    ref = reference_gradcam(model, "body", lambda m, a: m.fc(_pooled(a * a)), x, torch.tensor([0, 4]))
    assert (maps - ref).abs().max() < 1e-4


def test_default_layer_pred_target_and_size():
    model, _, _, x = build("resnet18")
    cam = GradCAM(model, target="pred")
    maps = cam(x)
    assert cam.layer_name == "layer4" and maps.shape == (3, 3, 3)
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert torch.allclose(maps, GradCAM(model, "layer4")(x, pred))
    big = GradCAM(model, "layer4", size=(12, 12))(x, pred)
    assert big.shape == (3, 12, 12)
    assert GradCAM(build("densenet121")[0])(torch.randn(1, 3, 64, 64), torch.tensor([0])).shape == (1, 2, 2)


def test_maps_are_relu_max_normalised_and_zero_maps_stay_zero():
    model, layer, _, x = build("small_resnet")
    maps = GradCAM(model, layer)(x, torch.tensor([0, 1, 2]))
    assert float(maps.min()) >= 0
    peaks = maps.amax((1, 2))
    assert torch.all((peaks == 0) | ((peaks - 1).abs() < 1e-6))
    with torch.no_grad():
        model.fc.weight.zero_()
    assert float(GradCAM(model, layer)(x, torch.tensor([0, 1, 2])).abs().max()) == 0
    assert torch.equal(normalise_maps(-torch.ones(2, 3, 3)), torch.zeros(2, 3, 3))


def test_no_side_effects_on_modes_flags_grads_and_buffers():
    model, layer, _, x = build("resnet18")
    model.train()
    model.layer1.eval()  # a mixed state must survive exactly
    model.conv1.weight.requires_grad_(False)
    before_modes = [m.training for m in model.modules()]
    before_flags = [p.requires_grad for p in model.parameters()]
    running_mean = model.bn1.running_mean.clone()
    for closed_form in (True, False):
        GradCAM(model, layer, closed_form=closed_form)(x, torch.tensor([1, 2, 3]))
        assert [m.training for m in model.modules()] == before_modes
        assert [p.requires_grad for p in model.parameters()] == before_flags
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(model.bn1.running_mean, running_mean)
        assert not model.get_submodule(layer)._forward_hooks
    assert torch.is_grad_enabled()


def test_hooks_are_removed_and_modes_restored_on_exceptions():
    model, layer, _, x = build("resnet18")
    model.train()
    with pytest.raises(ValueError, match="sample 2 asks for class 99, but the model gives"):
        GradCAM(model, layer, closed_form=False)(x, torch.tensor([1, 2, 99]))  # class 99 does not exist
    assert model.training and not model.get_submodule(layer)._forward_hooks
    with pytest.raises(ValueError, match="no layer 'layer9'.*layer4"):
        GradCAM(model, "layer9")
    with pytest.raises(ValueError, match="needs targets"):
        GradCAM(model, layer)(x)


def test_harvest_pieces_give_the_same_maps_from_a_training_forward():
    model, layer, _, x = build("small_resnet")
    targets = torch.tensor([4, 5, 6])
    model.train()
    with ActivationCapture(model, layer) as capture:
        logits = model(x)  # a normal training forward: the graph stays intact
    logits.sum().backward()
    assert model.fc.weight.grad is not None and not model.get_submodule(layer)._forward_hooks
    harvested = cam_from_activations(capture.activations, model.fc.weight, targets)
    # In train mode BatchNorm uses batch statistics, so compare with Grad-CAM of the same activations.
    ref = reference_gradcam_from(capture.activations, model, targets)
    assert (harvested - ref).abs().max() < 1e-4


def reference_gradcam_from(activations, model, targets):
    a = activations.detach().clone().requires_grad_(True)
    (grads,) = torch.autograd.grad(model.fc(_pooled(a)).gather(1, targets[:, None]).sum(), a)
    return normalise_maps((grads.mean((2, 3))[:, :, None, None] * a).sum(1).detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_cuda_maps_match_cpu_maps(name):
    model, layer, _, x = build(name)
    targets = torch.tensor([3, 7, 0])
    cpu = GradCAM(model, layer)(x, targets)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 convolutions would differ by ~1e-2
        gpu = GradCAM(model.cuda(), layer)(x.cuda(), targets.cuda())
    assert gpu.device.type == "cuda" and (gpu.cpu() - cpu).abs().max() < 1e-3


def test_gradient_path_works_when_the_caller_is_under_no_grad():
    model, layer, head, x = build("densenet121")
    targets = torch.tensor([3, 7, 0])
    with torch.no_grad():
        maps = GradCAM(model, layer)(x, targets)
    assert (maps - reference_gradcam(model, layer, head, x, targets)).abs().max() < 1e-3
