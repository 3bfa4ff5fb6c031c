"""Grad-CAM speed: ours vs a plain no_grad forward vs pytorch-grad-cam (ms per batch, side by side).

    python bench/gradcam.py                       # CPU: resnet18 + resnet50, batch 64, 224 px
    python bench/gradcam.py --device cuda --repeats 20
Goal on CPU: ours <= 1.10x the plain forward and >= 3x faster than pytorch-grad-cam.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import describe_device, time_side_by_side  # noqa: E402

from gutout import GradCAM  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-oracle", action="store_true", help="skip pytorch-grad-cam")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"# Grad-CAM, batch {args.batch}, {args.size} px, {describe_device(device)}, median of {args.repeats}")
    print(
        "| model | plain forward ms | ours ms | ours, gradient path ms | pytorch-grad-cam ms "
        "| ours / forward | pytorch-grad-cam / ours |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = getattr(torchvision.models, name)().to(device).eval()
        images = torch.randn(args.batch, 3, args.size, args.size, device=device)
        labels = torch.randint(0, 1000, (args.batch,), device=device)
        ours = GradCAM(model, "layer4")
        gradient_path = GradCAM(model, "layer4", closed_form=False)

        def plain_forward():
            with torch.no_grad():
                return model(images)

        candidates = {
            "forward": plain_forward,
            "ours": lambda: ours(images, labels),
            "gradient": lambda: gradient_path(images, labels),
        }
        if not args.no_oracle:
            try:
                from pytorch_grad_cam import GradCAM as OracleCAM
                from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
            except ImportError:
                print(f"(pytorch-grad-cam is not installed: skipped for {name})")
            else:
                oracle = OracleCAM(model, [model.layer4])
                targets = [ClassifierOutputTarget(int(t)) for t in labels]
                candidates["oracle"] = lambda: oracle(images, targets)
        ms = time_side_by_side(candidates, device, args.repeats)
        oracle_ms = ms.get("oracle", float("nan"))
        print(
            f"| {name} | {ms['forward']:.1f} | {ms['ours']:.1f} | {ms['gradient']:.1f} | {oracle_ms:.1f} "
            f"| {ms['ours'] / ms['forward']:.3f} | {oracle_ms / ms['ours']:.2f} |"
        )


if __name__ == "__main__":
    main()
