"""A log-log line chart as a PNG, drawn with Pillow (in the lock; matplotlib is not).

Enough for a benchmark figure: decade grid lines on both axes, one coloured polyline with
markers per series, a legend. Pillow writes the PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#393b79", "#637939"]
_SIZE = (960, 600)
_MARGIN = (80, 50, 230, 60)  # left, top, right (legend), bottom


def _decades(low: float, high: float) -> tuple[int, int]:
    """The powers of ten that bracket [low, high] (at least one decade apart)."""
    start, stop = math.floor(math.log10(low)), math.ceil(math.log10(high))
    return start, max(stop, start + 1)


def _label(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:g}{suffix}"
    return f"{value:g}"


def log_log_plot(path: Path, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
                 title: str) -> None:
    """Draw ``series`` ({name: [(x, y), ...]}, x and y > 0) on log-log axes into the PNG ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    points = [point for values in series.values() for point in values]
    if not points:
        return
    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)  # Pillow's bundled scalable font (FreeType), no system font needed
    left, top, right, bottom = _MARGIN[0], _MARGIN[1], _SIZE[0] - _MARGIN[2], _SIZE[1] - _MARGIN[3]
    x_range = _decades(min(x for x, _ in points), max(x for x, _ in points))
    y_range = _decades(min(y for _, y in points), max(y for _, y in points))

    def at(x: float, y: float) -> tuple[float, float]:
        fx = (math.log10(x) - x_range[0]) / (x_range[1] - x_range[0])
        fy = (math.log10(y) - y_range[0]) / (y_range[1] - y_range[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for power in range(x_range[0], x_range[1] + 1):
        x, _ = at(10.0**power, 10.0 ** y_range[0])
        draw.line([(x, top), (x, bottom)], fill="#dddddd")
        draw.text((x - 10, bottom + 6), _label(10.0**power), fill="black", font=font)
    for power in range(y_range[0], y_range[1] + 1):
        _, y = at(10.0 ** x_range[0], 10.0**power)
        draw.line([(left, y), (right, y)], fill="#dddddd")
        draw.text((left - 40, y - 6), _label(10.0**power), fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 12), title, fill="black", font=font)
    draw.text(((left + right) / 2 - 40, bottom + 28), f"{x_label} (log)", fill="black", font=font)
    draw.text((8, top - 24), f"{y_label} (log)", fill="black", font=font)
    for index, (name, values) in enumerate(series.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        xy = [at(x, y) for x, y in sorted(values)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_y = top + 18 * index
        draw.line([(right + 16, legend_y + 6), (right + 40, legend_y + 6)], fill=colour, width=3)
        draw.text((right + 46, legend_y), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
