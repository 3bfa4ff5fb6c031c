"""Build a real-photo JPEG corpus for loader benchmarks, in ImageFolder layout.

Sources: Debian's wallpaper packages (`apt-get install gnome-backgrounds mate-backgrounds`), which put
wallpapers of 1-23 megapixels under /usr/share/backgrounds/. The JPEG ones are photos (nature, animals);
the PNG/WebP ones are smooth renders that compress far better than photos, so they are left out. Each
corpus image is a random crop of a source, downscaled (as camera photos are) to an ImageNet-like size
around 500 x 375 and re-encoded as JPEG (quality 90 unless told). Deterministic for a given seed.

    python bench/make_corpus.py --out .bench-data/corpus --images 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUNDS = Path("/usr/share/backgrounds")
SOURCE_SUFFIXES = (".jpg", ".jpeg")  # photos; see above
# (width, height) of the outputs: ImageNet's common shapes, landscape three times as often as portrait.
SHAPES = ((500, 375), (500, 333), (500, 400), (375, 500), (400, 300), (500, 375))


def find_sources(root: Path = BACKGROUNDS, min_side: int = 800) -> list[Path]:
    """Photo wallpapers large enough to crop from, sorted (so the corpus is reproducible)."""
    sources = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in SOURCE_SUFFIXES:
            continue
        with Image.open(path) as image:
            if min(image.size) >= min_side:
                sources.append(path)
    if not sources:
        raise SystemExit(f"no wallpapers under {root}: apt-get install -y gnome-backgrounds mate-backgrounds (as root)")
    return sources


def random_view(image: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A crop of 50-100% of the source's shorter side with the output's aspect, downscaled to `size`."""
    width, height = size
    side = min(image.size) * rng.uniform(0.5, 1.0)  # large crops: more detail per output pixel
    crop_w, crop_h = (side, side * height / width) if width >= height else (side * width / height, side)
    x0 = rng.uniform(0, image.width - crop_w)
    y0 = rng.uniform(0, image.height - crop_h)
    return image.resize(size, Image.Resampling.LANCZOS, box=(x0, y0, x0 + crop_w, y0 + crop_h))


def build(out: Path, images: int, classes: int, seed: int, quality: int = 90) -> Path:
    done = sorted(out.glob("*/*.jpg"))
    if len(done) == images:
        print(f"{out}: {images} images already there")
        return out
    rng = np.random.default_rng(seed)
    sources = find_sources()
    per_source = -(-images // len(sources))
    count = 0
    for s, path in enumerate(sources):
        with Image.open(path) as opened:
            source = opened.convert("RGB")  # RGBA / LA wallpapers become plain RGB photos
        for _ in range(min(per_source, images - count)):
            folder = out / f"class{count % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            size = SHAPES[rng.integers(len(SHAPES))]
            random_view(source, size, rng).save(folder / f"{count:05d}.jpg", quality=quality)
            count += 1
        print(f"[{s + 1}/{len(sources)}] {path.name}: {count} images")
    total = sum(f.stat().st_size for f in out.glob("*/*.jpg"))
    print(f"{out}: {count} JPEGs, {total / count / 1024:.0f} KiB on average, {classes} classes")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".bench-data/corpus"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (ImageNet's files: mostly 90-96)")
    args = parser.parse_args()
    build(args.out, args.images, args.classes, args.seed, args.quality)


if __name__ == "__main__":
    main()
