"""Write the shipped tiny vision-language demo data: small PNG shapes and ShareGPT captions.

32x32 shapes, plus a few of other sizes and aspect ratios (dynamic-resolution models see
them at their own size).

    python scripts/make_tiny_vlm_assets.py [OUT_DIR]   (default megatron_patch/assets/tiny_vlm)

Deterministic: the same files on every run (the images are drawn, not downloaded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 32
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
SIZED = (("red", "circle", 56, 32), ("green", "square", 24, 48), ("blue", "triangle", 48, 48),
         ("yellow", "circle", 40, 24))
QUESTIONS = ("<image>\nWhat is in the picture?", "Describe this image.\n<image>",
             "<image>\nWhat shape and colour do you see?")


def draw(shape: str, colour: tuple[int, int, int], width: int = SIZE,
         height: int = SIZE) -> Image.Image:
    """A ``shape`` of ``colour`` on a white ``width`` x ``height`` background."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    box = (6, 6, width - 7, height - 7)
    if shape == "square":
        pen.rectangle(box, fill=colour)
    elif shape == "circle":
        pen.ellipse(box, fill=colour)
    else:
        pen.polygon([(width // 2, 5), (5, height - 6), (width - 6, height - 6)], fill=colour)
    return image


def main(out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        for j, shape in enumerate(SHAPES):
            name = f"images/{colour}_{shape}.png"
            draw(shape, rgb).save(out / name, optimize=True)
            answer = f"A {colour} {shape} on a white background."
            records.append({"id": f"{colour}-{shape}", "images": [name], "conversations": [
                {"from": "human", "value": QUESTIONS[(i + j) % len(QUESTIONS)]},
                {"from": "gpt", "value": answer},
                {"from": "human", "value": "What colour is it?"},
                {"from": "gpt", "value": f"It is {colour}."}]})
    pairs = [("red", "square", "blue", "circle"), ("green", "triangle", "yellow", "square")]
    for a, s, b, t in pairs:  # two images in one conversation
        records.append({"id": f"{a}-{s}+{b}-{t}",
                        "images": [f"images/{a}_{s}.png", f"images/{b}_{t}.png"],
                        "conversations": [
                            {"from": "human", "value": "<image>\n<image>\nHow do they differ?"},
                            {"from": "gpt", "value": f"The first is a {a} {s}, the second a "
                                                     f"{b} {t}."}]})
    for colour, shape, width, height in SIZED:  # other sizes and aspect ratios
        name = f"images/{colour}_{shape}_{width}x{height}.png"
        draw(shape, COLOURS[colour], width, height).save(out / name, optimize=True)
        form = "wide" if width > height else "tall" if height > width else "large"
        records.append({"id": f"{colour}-{shape}-{width}x{height}", "images": [name],
                        "conversations": [
                            {"from": "human", "value": "<image>\nWhat is in the picture?"},
                            {"from": "gpt", "value": f"A {form} {colour} {shape} on a white "
                                                     "background."}]})
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (out / "tiny_vlm_chat.jsonl").write_text(lines)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else
         Path(__file__).resolve().parents[1] / "megatron_patch" / "assets" / "tiny_vlm")
