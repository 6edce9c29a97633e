"""Draw the source images of examples/prompts/edit.jsonl into examples/prompts/sources/.

Simple, deterministic Pillow drawings (shapes, a sign with text, a house, a lake):
no downloaded data, nothing binary in the repository. Run it once before
`gcr eval examples/prompts/edit.jsonl ...`:

    python examples/make_edit_sources.py [--out DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (512, 512)
DEFAULT_OUT = Path(__file__).resolve().parent / "prompts" / "sources"


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled default font at a given size: no system font, same pixels everywhere.
    return ImageFont.load_default(size=size)


def _centered_text(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, size: int, fill: str | tuple[int, int, int]
) -> None:
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = box[0] + (box[2] - box[0] - (right - left)) // 2 - left
    y = box[1] + (box[3] - box[1] - (bottom - top)) // 2 - top
    draw.text((x, y), text, font=font, fill=fill)


def red_circle() -> Image.Image:
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((136, 136, 376, 376), fill=(220, 30, 40), outline="black", width=4)
    return image


def street_sign() -> Image.Image:
    image = Image.new("RGB", SIZE, (170, 205, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((248, 230, 264, 512), fill=(110, 110, 115))
    draw.rounded_rectangle((96, 150, 416, 250), radius=12, fill=(20, 120, 60), outline="white", width=6)
    _centered_text(draw, (96, 150, 416, 250), "MAIN ST", 56, "white")
    return image


def shapes() -> Image.Image:
    image = Image.new("RGB", SIZE, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((70, 180, 230, 340), fill=(30, 70, 200))
    draw.polygon([(360, 170), (450, 340), (270, 340)], fill=(245, 200, 20))
    return image


def house() -> Image.Image:
    image = Image.new("RGB", SIZE, (135, 190, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 400, 512, 512), fill=(80, 160, 70))
    draw.ellipse((400, 40, 470, 110), fill=(255, 215, 0))
    draw.rectangle((136, 240, 376, 420), fill=(200, 160, 120), outline="black", width=3)
    draw.polygon([(116, 240), (256, 130), (396, 240)], fill=(150, 40, 40), outline="black")
    draw.rectangle((232, 330, 280, 420), fill=(90, 50, 20))
    for left in (160, 304):
        draw.rectangle((left, 270, left + 48, 318), fill=(200, 230, 250), outline="black", width=2)
    return image


def cafe_sign() -> Image.Image:
    image = Image.new("RGB", SIZE, (60, 50, 45))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 380, 512, 512), fill=(120, 100, 80))
    draw.rounded_rectangle((116, 140, 396, 300), radius=16, fill=(250, 245, 230), outline=(30, 30, 30), width=8)
    _centered_text(draw, (116, 140, 396, 300), "OPEN", 88, (20, 110, 40))
    return image


def lake() -> Image.Image:
    image = Image.new("RGB", SIZE)
    draw = ImageDraw.Draw(image)
    for y in range(260):  # a vertical sky gradient, light at the horizon
        shade = int(150 + 90 * y / 260)
        draw.line((0, y, 512, y), fill=(shade - 60, shade - 20, 255))
    draw.polygon([(0, 260), (140, 170), (300, 260)], fill=(70, 130, 70))
    draw.polygon([(200, 260), (380, 150), (512, 230), (512, 260)], fill=(50, 110, 60))
    draw.rectangle((0, 260, 512, 512), fill=(40, 90, 160))
    draw.rectangle((0, 440, 512, 512), fill=(190, 170, 120))
    return image


SOURCES: dict[str, Callable[[], Image.Image]] = {
    "red_circle": red_circle,
    "street_sign": street_sign,
    "shapes": shapes,
    "house": house,
    "cafe_sign": cafe_sign,
    "lake": lake,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in SOURCES.items():
        path = args.out / f"{name}.png"
        # optimize=False and no metadata: the same bytes on every run with the same Pillow.
        draw().save(path, format="PNG", optimize=False)
        print(path)


if __name__ == "__main__":
    main()
