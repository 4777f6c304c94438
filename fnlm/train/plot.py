"""The loss-curve PNG, drawn without matplotlib."""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

# 3x5 pixel glyphs, one string of 15 bits per character (rows top to bottom).
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001010010", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "s": "000011010001110", "t": "010111010010011",
    "p": "000111101111100", "l": "110010010010111", "o": "000111101101111",
    "v": "000101101101010", "a": "000011101101011", "i": "010000010010010",
    "n": "000110101101101", " ": "000000000000000", ":": "000010000010000",
}  # fmt: skip


def plot_losses(
    metrics: str | os.PathLike, png: str | os.PathLike, *, width: int = 640, height: int = 400
) -> Path | None:
    """Draw the training loss (blue) and eval loss (orange) of a metrics.jsonl as a PNG.

    Axes are labelled with the step and loss ranges. Returns the PNG path, or None when there
    is nothing to draw yet.
    """
    train, evals = [], []
    for line in Path(metrics).read_text().splitlines():
        entry = json.loads(line)
        if "eval_loss" in entry and math.isfinite(entry["eval_loss"]):
            evals.append((entry["step"], entry["eval_loss"]))
        elif "loss" in entry and math.isfinite(entry["loss"]):
            train.append((entry["step"], entry["loss"]))
    points = train + evals
    if not points:
        return None
    image = [[(255, 255, 255)] * width for _ in range(height)]
    left, right, top, bottom = 46, width - 12, 12, height - 24
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi - y_lo < 1e-6:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_pixel(x, y):
        px = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        py = bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
        return round(px), round(py)

    grey, black = (200, 200, 200), (0, 0, 0)
    for i in range(5):  # horizontal grid lines with loss labels
        y = y_lo + (y_hi - y_lo) * i / 4
        _, py = to_pixel(x_lo, y)
        _line(image, left, py, right, py, grey)
        _text(image, 2, py - 2, f"{y:.3g}", black)
    _line(image, left, top, left, bottom, black)
    _line(image, left, bottom, right, bottom, black)
    _text(image, left, bottom + 6, f"step {x_lo}", black)
    label = f"{x_hi}"
    _text(image, right - 4 * len(label) * 2, bottom + 6, label, black)
    for series, color in ((train, (31, 119, 180)), (evals, (255, 127, 14))):
        pixels = [to_pixel(x, y) for x, y in series]
        for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):
            _line(image, x0, y0, x1, y1, color)
        for x0, y0 in pixels if len(pixels) == 1 or color != (31, 119, 180) else []:
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    _dot(image, x0 + dx, y0 + dy, color)
    _text(image, right - 90, top + 2, "loss", (31, 119, 180))
    if evals:
        _text(image, right - 50, top + 2, "eval", (255, 127, 14))
    return _write_png(Path(png), image)


def _dot(image, x, y, color) -> None:
    if 0 <= y < len(image) and 0 <= x < len(image[0]):
        image[y][x] = color


def _line(image, x0, y0, x1, y1, color) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(steps + 1):
        _dot(image, round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), color)


def _text(image, x, y, text: str, color, scale: int = 2) -> None:
    for k, char in enumerate(text.lower()):
        bits = _GLYPHS.get(char, _GLYPHS[" "])
        for r in range(5):
            for c in range(3):
                if bits[r * 3 + c] == "1":
                    for dy in range(scale):
                        for dx in range(scale):
                            _dot(image, x + (k * 4 + c) * scale + dx, y + r * scale + dy, color)


def _write_png(path: Path, image) -> Path:
    height, width = len(image), len(image[0])
    raw = b"".join(b"\x00" + bytes(v for pixel in row for v in pixel) for row in image)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return (
            struct.pack(">I", len(payload))
            + body
            + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)
    return path
