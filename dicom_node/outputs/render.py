"""Draw the heatmap overlay, the boxes and the legend onto a display copy of the source image.

Pure array work with numpy and Pillow: no DICOM, no files.  The heatmap uses matplotlib's
perceptually uniform "inferno" colormap (33 of its 256 entries, linearly interpolated, which
stays within 2/255 of the full table), blended with an alpha that grows with the heat, so the
anatomy stays visible where the model did not look.  The legend sits in a band below the image
and never covers anatomy.

Each finding's boxes have their own colour and carry the finding's number, which starts its
legend line, so colour is never the only cue (a colour-blind reader matches numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's _inferno_data at indices 0, 8, ..., 248 and 255.
_INFERNO = np.array(
    [
        [0.0015, 0.0005, 0.0139],
        [0.0140, 0.0112, 0.0719],
        [0.0423, 0.0281, 0.1411],
        [0.0820, 0.0433, 0.2153],
        [0.1293, 0.0473, 0.2908],
        [0.1834, 0.0403, 0.3550],
        [0.2383, 0.0366, 0.3964],
        [0.2908, 0.0456, 0.4186],
        [0.3415, 0.0623, 0.4294],
        [0.3915, 0.0809, 0.4331],
        [0.4412, 0.0993, 0.4316],
        [0.4910, 0.1172, 0.4256],
        [0.5409, 0.1347, 0.4151],
        [0.5907, 0.1526, 0.4003],
        [0.6401, 0.1714, 0.3811],
        [0.6887, 0.1922, 0.3576],
        [0.7357, 0.2159, 0.3302],
        [0.7805, 0.2433, 0.2995],
        [0.8224, 0.2752, 0.2661],
        [0.8605, 0.3119, 0.2306],
        [0.8943, 0.3534, 0.1936],
        [0.9232, 0.3994, 0.1552],
        [0.9470, 0.4492, 0.1153],
        [0.9654, 0.5022, 0.0739],
        [0.9784, 0.5579, 0.0349],
        [0.9860, 0.6158, 0.0256],
        [0.9879, 0.6753, 0.0653],
        [0.9841, 0.7361, 0.1295],
        [0.9746, 0.7977, 0.2063],
        [0.9606, 0.8591, 0.2980],
        [0.9476, 0.9174, 0.4107],
        [0.9545, 0.9659, 0.5404],
        [0.9884, 0.9984, 0.6449],
    ],
    dtype=np.float32,
)
_INFERNO_AT = np.array([*range(0, 256, 8), 255], dtype=np.float32) / 255.0

# Box and legend colours, one per finding shown in an image (``sc.plan_captures`` never puts
# more findings in one image).  Okabe-Ito's colours first, then Paul Tol's light, bright and
# vibrant ones, white, grey and magenta, each added greedily for the largest smallest CIELAB
# distance to those before it under normal, protan and deutan vision (Machado 2009
# simulation), among colours light enough (L* >= 55) to read over dark lung; a black halo
# keeps them readable over bone and the heatmap's bright end.
BOX_COLOURS = (
    (0xE6, 0x9F, 0x00),
    (0x56, 0xB4, 0xE9),
    (0x00, 0x9E, 0x73),
    (0xF0, 0xE4, 0x42),
    (0xFF, 0xFF, 0xFF),
    (0xEE, 0xDD, 0x88),
    (0xBB, 0xBB, 0xBB),
    (0x99, 0xDD, 0xFF),
    (0xFF, 0x00, 0xFF),
    (0xEE, 0x77, 0x33),
    (0xCC, 0x79, 0xA7),
    (0xEE, 0x66, 0x77),
)
HALO = (0, 0, 0)
MAX_ALPHA = 0.55
HEAT_FLOOR = 0.2  # below this fraction of the peak the overlay is fully transparent
# DejaVu (Debian's fonts-dejavu-core) has every glyph the legend uses, the en dash included;
# without it, Pillow's built-in font is used and the dash drawn as a hyphen.
LEGEND_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@dataclass(frozen=True)
class LegendLine:
    text: str
    colour: tuple[int, int, int] = (255, 255, 255)


def colormap(values: np.ndarray) -> np.ndarray:
    """RGB (0-255, uint8) of ``values`` in [0, 1] through the inferno colormap."""
    flat = np.clip(values, 0.0, 1.0).ravel()
    rgb = np.stack([np.interp(flat, _INFERNO_AT, _INFERNO[:, c]) for c in range(3)], axis=-1)
    return (rgb.reshape(*values.shape, 3) * 255.0 + 0.5).astype(np.uint8)


def overlay(grey: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """Blend ``heat`` ([0, 1], same shape) over the uint8 ``grey`` image; RGB uint8.

    Heat is quantised to 256 levels and looked up in colour and alpha tables, then blended
    in 8.8 fixed point: the same picture as float blending (within 1/255), several times
    faster on a 2048-pixel image.
    """
    base = np.repeat(grey[..., None], 3, axis=-1)
    if heat is None:
        return base
    levels = np.arange(256, dtype=np.float32) / 255.0
    colours = colormap(levels).astype(np.uint16)
    ramp = np.clip((levels - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0)
    alphas = np.round(MAX_ALPHA * ramp * 256).astype(np.uint16)
    index = np.round(np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8)
    alpha = alphas[index][..., None]
    blended = base.astype(np.uint16) * (256 - alpha) + colours[index] * alpha + 128
    return (blended >> 8).astype(np.uint8)


def box_colour(index: int) -> tuple[int, int, int]:
    """The colour of the finding at ``index`` in its image (and of its legend line)."""
    return BOX_COLOURS[index % len(BOX_COLOURS)]


def box_width(shape: tuple[int, ...]) -> int:
    """The outline width in pixels, growing with the image."""
    return max(2, round(max(shape[:2]) / 400))


def draw_boxes(
    rgb: np.ndarray, boxes: Sequence[tuple[tuple[int, int, int, int], int]]
) -> np.ndarray:
    """Draw each (x0, y0, x1, y1) box, already in ``rgb``'s pixels, for its finding index.

    The outline is the finding's colour inside a one-pixel black halo, and a tag in the top
    left corner holds the finding's number (index + 1), as its legend line does.
    """
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    width = box_width(rgb.shape)
    font, _ = _font(max(12, round(max(rgb.shape[:2]) / 60)))
    for (x0, y0, x1, y1), index in boxes:
        corner = (max(x0, x1 - 1), max(y0, y1 - 1))
        draw.rectangle(
            [x0 - 1, y0 - 1, corner[0] + 1, corner[1] + 1], outline=HALO, width=width + 2
        )
        draw.rectangle([x0, y0, *corner], outline=box_colour(index), width=width)
        _number_tag(draw, (x0, y0), str(index + 1), box_colour(index), font)
    return np.asarray(image)


def _number_tag(
    draw: ImageDraw.ImageDraw,
    at: tuple[int, int],
    text: str,
    colour: tuple[int, int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """``text`` in black on a ``colour`` tag whose top left corner is ``at``."""
    left, top, right, bottom = draw.textbbox(at, text, font=font)
    pad = max(1, (bottom - top) // 5)
    draw.rectangle([at[0], at[1], right + 2 * pad, bottom + pad], fill=colour, outline=HALO)
    draw.text((at[0] + pad, at[1]), text, fill=HALO, font=font)


def add_legend(rgb: np.ndarray, lines: Sequence[LegendLine]) -> np.ndarray:
    """Append a black band below the image holding ``lines``, one per row of text."""
    rows, columns = rgb.shape[:2]
    size = max(12, round(max(rows, columns) / 60))
    font, has_dash = _font(size)
    line_height = round(size * 1.35)
    band = line_height * len(lines) + size
    canvas = Image.new("RGB", (columns, rows + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        text = line.text if has_dash else line.text.replace("–", "-").replace("…", "...")
        text = _fit(draw, text, font, columns - size)
        draw.text(
            (size // 2, rows + size // 2 + index * line_height), text, fill=line.colour, font=font
        )
    return np.asarray(canvas)


def _font(size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, bool]:
    try:
        return ImageFont.truetype(LEGEND_FONT, size=size), True
    except OSError:
        return ImageFont.load_default(size=size), False


def _fit(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: int,
) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    while len(text) > 4 and draw.textlength(text, font=font) > width:
        text = text[:-2].rstrip() + "…"
    return text
