"""Regenerate the bundled sample images and jobs (``python examples/make_examples.py``).

Small, distinct pictures in several formats, so a local run exercises inlining, MIME
sniffing and the simulator's content-based descriptions without any network.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"

SAMPLES = [
    ("red-square.png", "PNG", (64, 64), (208, 32, 32)),
    ("green-banner.jpg", "JPEG", (96, 32), (40, 170, 60)),
    ("blue-tile.webp", "WEBP", (48, 48), (30, 60, 200)),
    ("yellow-dot.gif", "GIF", (40, 40), (240, 220, 40)),
    ("grey-card.png", "PNG", (80, 50), (128, 128, 128)),
    ("purple-stripe.jpg", "JPEG", (120, 24), (120, 40, 160)),
    ("orange-disc.png", "PNG", (56, 56), (240, 140, 20)),
    ("cyan-wave.webp", "WEBP", (72, 36), (30, 200, 210)),
]


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    jobs = []
    for i, (name, fmt, size, colour) in enumerate(SAMPLES):
        img = Image.new("RGB", size, colour)
        draw = ImageDraw.Draw(img)
        # A small contrasting mark so the images are not flat fills.
        w, h = size
        draw.rectangle(
            (w // 4, h // 4, w // 4 + max(2, w // 10), h // 4 + max(2, h // 10)),
            fill=(250, 250, 250),
        )
        img.save(IMAGES / name, fmt)
        job: dict[str, str] = {"id": f"sample-{i + 1:02d}", "image_uri": f"examples/images/{name}"}
        if i == 2:
            job["prompt"] = "Describe the following image in one sentence:"
        jobs.append(job)
    with (HERE / "jobs.jsonl").open("w") as out:
        for job in jobs:
            out.write(json.dumps(job) + "\n")
        # A bare-path line shows the other accepted form (its id is a hash of the job).
        out.write("examples/images/cyan-wave.webp\n")


if __name__ == "__main__":
    main()
