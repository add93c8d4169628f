"""Evaluation and training reports: metrics JSON, an HTML page with a paper-style PNG grid,
a loss-curve PNG and a CSV metrics log.

The grid has one row per sample and four columns, like the qualitative tables of referring-
segmentation papers: referring text | image | prediction (overlay) | ground truth (overlay).
Rendering uses PIL only; the loss curve uses matplotlib's Agg canvas directly, so no global
matplotlib backend is switched and nothing needs a display.
"""
from __future__ import annotations

import csv
import html
import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PRED_COLOR = (230, 40, 40)  # red overlay for predictions
GT_COLOR = (40, 200, 80)  # green overlay for ground truth
HEADER_HEIGHT = 28
COLUMNS = ("referring text", "image", "prediction", "ground truth")


@dataclass
class GridRow:
    """One row of the qualitative grid.

    Attributes:
        phrase: the referring text.
        image: RGB PIL image (W, H).
        pred: predicted mask, bool (H, W) — or float probabilities, thresholded at 0.5.
        gt: ground-truth mask, bool (H, W), or None when there is none.
        note: an extra line under the phrase, e.g. "IoU 0.83".
    """

    phrase: str
    image: Image.Image
    pred: np.ndarray
    gt: np.ndarray | None = None
    note: str = ""


def _jsonable(value: Any) -> Any:
    """Recursively make metrics JSON-safe: NaN/inf → None, numpy scalars → Python, keys → str."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN
    return value


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write `metrics` (nested dicts of numbers/strings) as strict, indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(metrics), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def overlay(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int], alpha: float = 0.5) -> Image.Image:
    """RGB image with `mask` (bool (H, W), or float > 0.5) tinted in `color` and outlined."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask)
    m = m > 0.5 if m.dtype != bool else m
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask {m.shape} does not match image (H, W) {rgb.shape[:2]}")
    out = rgb.copy()
    out[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color, np.float32)
    # A solid outline keeps thin or low-contrast masks visible at thumbnail size.
    edge = m & ~(
        np.pad(m, 1, mode="edge")[:-2, 1:-1] & np.pad(m, 1, mode="edge")[2:, 1:-1]
        & np.pad(m, 1, mode="edge")[1:-1, :-2] & np.pad(m, 1, mode="edge")[1:-1, 2:]
    )
    out[edge] = color
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """`image` scaled to fit a cell x cell square, centred on white."""
    im = image.copy()
    im.thumbnail((cell, cell), Image.BILINEAR)
    canvas = Image.new("RGB", (cell, cell), "white")
    canvas.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return canvas


def grid_size(n_rows: int, cell: int = 160, text_width: int = 240) -> tuple[int, int]:
    """(W, H) in pixels of the grid `render_grid` draws for `n_rows` rows."""
    return (text_width + 3 * cell, HEADER_HEIGHT + n_rows * cell)


def render_grid(rows: Sequence[GridRow], cell: int = 160, text_width: int = 240) -> Image.Image:
    """Paper-style qualitative grid: text | image | prediction overlay | ground-truth overlay.

    Returns:
        RGB image of size `grid_size(len(rows), cell, text_width)`.
    """
    w, h = grid_size(len(rows), cell, text_width)
    grid = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(grid)
    font, small = _font(14), _font(12)
    lefts = [0, text_width, text_width + cell, text_width + 2 * cell]
    for x, title in zip(lefts, COLUMNS):
        draw.text((x + 6, 6), title, fill="black", font=font)
    draw.line([(0, HEADER_HEIGHT - 1), (w, HEADER_HEIGHT - 1)], fill=(120, 120, 120))
    chars = max(8, text_width // 8)  # ~8 px per character at 14 px
    for i, row in enumerate(rows):
        top = HEADER_HEIGHT + i * cell
        lines = textwrap.wrap(row.phrase, chars)[: max(1, cell // 20 - 1)]
        y = top + 8
        for line in lines:
            draw.text((6, y), line, fill="black", font=font)
            y += 18
        if row.note:
            draw.text((6, y + 4), row.note, fill=(90, 90, 90), font=small)
        grid.paste(_fit(row.image, cell), (lefts[1], top))
        grid.paste(_fit(overlay(row.image, row.pred, PRED_COLOR), cell), (lefts[2], top))
        gt_cell = _fit(overlay(row.image, row.gt, GT_COLOR), cell) if row.gt is not None else Image.new("RGB", (cell, cell), (235, 235, 235))
        grid.paste(gt_cell, (lefts[3], top))
        # Separator under the text only: the image cells must stay pixel-exact.
        draw.line([(0, top + cell - 1), (text_width - 1, top + cell - 1)], fill=(220, 220, 220))
    return grid


def write_loss_curve(
    path: str | os.PathLike,
    points: Iterable[tuple[float, float]],
    title: str = "training loss",
    size: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
    log_scale: bool = False,
) -> Path:
    """Plot (step, loss) pairs to a PNG of size (size[0] * dpi, size[1] * dpi) pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = sorted((float(s), float(l)) for s, l in points)
    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if pts:
        steps, losses = zip(*pts)
        ax.plot(steps, losses, linewidth=1.2)
        if len(pts) >= 20:
            # A moving average shows the trend under noisy per-step losses.
            k = max(2, len(pts) // 20)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, linewidth=2.0, label=f"mean of {k}")
            ax.legend()
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")  # no bbox_inches="tight": callers rely on the exact size
    return path


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else html.escape(str(value))
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{shown}</td></tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _sweep_table(sweep: Mapping[Any, Mapping[str, Any]]) -> str:
    keys = [k for k in next(iter(sweep.values())).keys() if k != "n"]
    head = "<tr><th>threshold</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"
    body = []
    for t, m in sweep.items():
        cells = "".join(f"<td>{m[k]:.4f}</td>" if isinstance(m[k], float) else f"<td>{m[k]}</td>" for k in keys)
        body.append(f"<tr><th>{float(t):.1f}</th>{cells}</tr>")
    return "<table>\n" + head + "\n" + "\n".join(body) + "\n</table>"


def write_html_report(
    out_dir: str | os.PathLike,
    metrics: Mapping[str, Any],
    rows: Sequence[GridRow] = (),
    title: str = "Referring segmentation evaluation",
    sweep: Mapping[Any, Mapping[str, Any]] | None = None,
    loss_points: Iterable[tuple[float, float]] | None = None,
    cell: int = 160,
) -> Path:
    """Write metrics.json, grid.png (if rows), loss.png (if loss_points) and index.html to `out_dir`.

    Returns:
        Path of index.html; the page references the PNGs by relative name so the folder can move.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(metrics)
    if sweep is not None:
        payload["threshold_sweep"] = {f"{float(t):.1f}": m for t, m in sweep.items()}
    write_metrics_json(out / "metrics.json", payload)
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin:1em 0}"
        " th,td{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f4f4f4}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Metrics</h2>",
        _metrics_table(metrics),
        "<p><a href='metrics.json'>metrics.json</a></p>",
    ]
    if sweep:
        parts += ["<h2>Threshold sweep</h2>", _sweep_table(sweep)]
    if loss_points is not None:
        write_loss_curve(out / "loss.png", loss_points)
        parts += ["<h2>Training loss</h2>", "<img src='loss.png' alt='training loss curve'>"]
    if rows:
        render_grid(rows, cell=cell).save(out / "grid.png")
        parts += [
            "<h2>Examples</h2>",
            "<p>red: prediction, green: ground truth</p>",
            "<img src='grid.png' alt='referring text, image, prediction, ground truth'>",
        ]
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return index


class CSVMetricsLogger:
    """Appends one row of metrics per call to a CSV file (step first, then the metric columns).

    A metric that appears later than the first row widens the header: the file is rewritten with
    the new column (earlier rows get an empty cell), so a log never silently drops a value.
    Re-opening an existing file continues it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.fieldnames: list[str] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                self.fieldnames = next(csv.reader(f), [])

    def log(self, step: int, **metrics: Any) -> None:
        """Append {step, **metrics}; values are written with repr-free str() (floats in full)."""
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        new = [k for k in row if k not in self.fieldnames]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new and self.fieldnames:
            with open(self.path, newline="") as f:
                old_rows = list(csv.DictReader(f))
            self.fieldnames += new
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fieldnames)
                writer.writeheader()
                writer.writerows(old_rows)
        elif new:
            self.fieldnames = list(row)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fieldnames).writeheader()
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fieldnames).writerow(row)

    def read(self) -> list[dict[str, str]]:
        """All rows logged so far, as strings (csv has no types)."""
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))
