"""The inference benchmark behind `clipseg bench`: inference speed of our CLIPSeg path against transformers' ordinary CLIPSeg call.

Everything runs in one process on one set of random full-size weights (built once under `--work-dir`, nothing is
downloaded): ours (one truncated vision pass per image, caches, bf16) vs `CLIPSegForImageSegmentation` called the
way transformers' docs show (the image repeated once per prompt), the HTTP server (gunicorn, `backend.wsgi:app`)
vs the predictor called directly, the server's peak RSS, the vision pass's GFLOP/s vs a plain sgemm, and per-project
models (row h: memory of 50 projects' decoders over one backbone, cost of switching between two projects).
Each time is the median of `--repeats` runs after a warm-up run. `--tiny` runs the same code on a tiny random
model: for the test suite only, its numbers mean nothing.
"""
from benchmarks.inference.command import configure, run
from benchmarks.inference.common import build_or_reuse
from benchmarks.inference.server import check_predict_answer

__all__ = ["build_or_reuse", "check_predict_answer", "configure", "run"]
