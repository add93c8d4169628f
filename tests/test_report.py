"""Report writers: JSON, HTML page + grid PNG, loss curve, CSV log."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from finetune.metrics import MetricAccumulator, ThresholdSweep
from finetune.report import (
    GT_COLOR,
    HEADER_HEIGHT,
    PRED_COLOR,
    CSVMetricsLogger,
    GridRow,
    grid_size,
    overlay,
    render_grid,
    write_html_report,
    write_loss_curve,
    write_metrics_json,
)
from finetune.shapes import ShapesDataset


def _rows(n: int) -> list[GridRow]:
    rows = []
    for s in ShapesDataset(n, seed=0, image_size=96):
        pred = np.zeros_like(s.mask)
        pred[:, :48] = True  # left half: a wrong-ish prediction, easy to locate in the grid
        rows.append(GridRow(s.phrase, s.image, pred, s.mask, note="IoU 0.12"))
    return rows


def test_html_report_files(tmp_path) -> None:
    rows = _rows(3)
    acc = MetricAccumulator()
    sweep = ThresholdSweep()
    for r in rows:
        acc.update(r.pred, r.gt)
        sweep.update(r.pred.astype(np.float32) * 0.8, r.gt)
    index = write_html_report(tmp_path / "rep", acc.compute(), rows, sweep=sweep.compute(),
                              loss_points=[(i, 1.0 / (i + 1)) for i in range(30)], cell=100)
    html_text = index.read_text()
    assert "src='grid.png'" in html_text and "src='loss.png'" in html_text
    assert "prec@0.5" in html_text and "Threshold sweep" in html_text
    for phrase in (r.phrase for r in rows[:1]):
        assert phrase not in html_text  # phrases live in the PNG, the page only has metrics
    with Image.open(tmp_path / "rep" / "grid.png") as grid:
        assert grid.size == grid_size(3, cell=100) == (240 + 300, HEADER_HEIGHT + 300)
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["n"] == 3 and saved["miou"] == pytest.approx(acc.compute()["miou"])
    assert set(saved["threshold_sweep"]) == {f"0.{i}" for i in range(1, 10)}


def test_grid_cells_show_the_overlays() -> None:
    rows = _rows(2)
    cell, text_width = 96, 200  # images are 96 px: cells hold them unscaled
    grid = np.asarray(render_grid(rows, cell=cell, text_width=text_width)).astype(int)
    for i, row in enumerate(rows):
        top = HEADER_HEIGHT + i * cell
        raw = np.asarray(row.image).astype(int)
        img_cell = grid[top : top + cell, text_width : text_width + cell]
        pred_cell = grid[top : top + cell, text_width + cell : text_width + 2 * cell]
        gt_cell = grid[top : top + cell, text_width + 2 * cell :]
        assert np.array_equal(img_cell, raw)
        # Inside the predicted half: an even blend with PRED_COLOR; outside it: the image untouched.
        blend = (raw[5:90, 5:40] + np.asarray(PRED_COLOR)) / 2
        assert np.abs(pred_cell[5:90, 5:40] - blend).max() <= 1
        assert np.array_equal(pred_cell[:, 60:], raw[:, 60:])
        # Ground-truth cell differs from the image exactly on (and around the edge of) the gt mask.
        changed = (gt_cell != raw).any(axis=2)
        assert changed[row.gt].all() and not changed[~row.gt].any()
    # The text column has dark pixels (the phrase) in each row.
    assert (grid[HEADER_HEIGHT : HEADER_HEIGHT + cell, :text_width] < 100).any()


def test_overlay_colors_and_errors() -> None:
    img = Image.new("RGB", (4, 4), (0, 0, 0))
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    out = np.asarray(overlay(img, m, PRED_COLOR, alpha=0.5))
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[1, 1]) == PRED_COLOR  # 2x2 block: every pixel is an edge pixel
    big = np.zeros((6, 6), bool)
    big[1:5, 1:5] = True
    out = np.asarray(overlay(Image.new("RGB", (6, 6)), big, GT_COLOR, alpha=0.5))
    assert tuple(out[2, 2]) == tuple(int(c * 0.5) for c in GT_COLOR)  # interior: blended
    with pytest.raises(ValueError):
        overlay(img, np.zeros((3, 4), bool), PRED_COLOR)


def test_metrics_json_is_strict(tmp_path) -> None:
    path = write_metrics_json(tmp_path / "m.json", {"miou": float("nan"), "n": np.int64(3), "sweep": {0.5: {"x": np.float32(0.25)}}})
    text = path.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"miou": None, "n": 3, "sweep": {"0.5": {"x": 0.25}}}


def test_loss_curve_png(tmp_path) -> None:
    path = write_loss_curve(tmp_path / "loss.png", [(s, math.exp(-s / 50)) for s in range(100)], size=(5, 3), dpi=80)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (400, 240)
        arr = np.asarray(im.convert("RGB"))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 5  # something was drawn
    with Image.open(write_loss_curve(tmp_path / "empty.png", [])) as im:
        assert im.size == (600, 400)


def test_csv_logger_widens_header_and_resumes(tmp_path) -> None:
    path = tmp_path / "logs" / "metrics.csv"
    log = CSVMetricsLogger(path)
    log.log(1, loss=0.5)
    log.log(2, loss=0.25, miou=0.7)
    again = CSVMetricsLogger(path)  # resume
    again.log(3, loss=0.125, miou=float("nan"))
    rows = again.read()
    assert path.read_text().splitlines()[0] == "step,loss,miou"
    assert rows == [
        {"step": "1", "loss": "0.5", "miou": ""},
        {"step": "2", "loss": "0.25", "miou": "0.7"},
        {"step": "3", "loss": "0.125", "miou": ""},
    ]
