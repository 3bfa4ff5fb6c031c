"""A one-minute look at Gutout on Fashion-MNIST (CPU): train a small ResNet briefly, take Grad-CAM of test
images at their true labels, cut them, and write `runs/saliency-demo/gutout.png`.

    python -m gutout.train.saliency_demo
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gutout import CutConfig, GradCAM, cut
from gutout.pipelines.datasets import STATS, load_fashion_mnist
from gutout.train.models import small_resnet


def main(out_dir: str = "runs/saliency-demo", samples: int = 12000, epochs: int = 2, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(seed)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    mean, std = (torch.tensor(s).view(1, -1, 1, 1) for s in STATS["fashion-mnist"])

    def normalise(images_uint8):  # (B, H, W, C) uint8 -> (B, C, H, W) float
        return (images_uint8.permute(0, 3, 1, 2).float() / 255 - mean) / std

    model = small_resnet(10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(train))[:samples]
        for step in range(0, samples, 256):
            idx = order[step : step + 256]
            x = normalise(train.images[idx])
            x = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x.flip(-1), x)  # flip
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"epoch {epoch}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    x, y = normalise(test.images[:8]), test.labels[:8]
    with torch.no_grad():
        acc = (model(normalise(test.images[:2000])).argmax(1) == test.labels[:2000]).float().mean()
    print(f"test accuracy on 2000 images: {acc:.3f}")
    maps = GradCAM(model, "layer3")(x, y)  # (8, 7, 7) canonical frame: the whole image
    windows = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(8, 4)
    flips = torch.zeros(8, dtype=torch.bool)
    cut_images, erased = cut(x, maps, windows, flips, CutConfig(policy="threshold", threshold=0.5))
    upsampled = F.interpolate(maps[:, None], size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    fig, axes = plt.subplots(3, 8, figsize=(12, 5))
    for i in range(8):
        axes[0, i].imshow(x[i, 0], cmap="gray")
        axes[0, i].set_title(test.classes[y[i]], fontsize=8)
        axes[1, i].imshow(x[i, 0], cmap="gray")
        axes[1, i].imshow(upsampled[i], cmap="jet", alpha=0.5)
        axes[2, i].imshow(cut_images[i, 0], cmap="gray")
        axes[2, i].set_title(f"erased {erased[i]:.0%}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    for row, label in enumerate(["image", "Grad-CAM", "Gutout (t = 0.5)"]):
        axes[row, 0].text(-4, 14, label, rotation=90, va="center", ha="right", fontsize=9)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "gutout.png", dpi=100, bbox_inches="tight")
    print(f"wrote {out / 'gutout.png'}")
    return out / "gutout.png"


if __name__ == "__main__":
    main()
