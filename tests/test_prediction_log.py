"""The prediction recorder: /predict hands our masks over and returns; a thread writes them to Redis."""
from __future__ import annotations

import time

import numpy as np
import redis

from backend.serving.prediction_log import PredictionRecord, PredictionRecorder
from finetune.corrections import CorrectionStore


def records(n: int) -> list[PredictionRecord]:
    mask = np.zeros((8, 10), bool)
    mask[2:5, 3:7] = True
    return [PredictionRecord("3", 100 + i, "cat", f"the cat {i}", mask, 0.5, "v1") for i in range(n)]


def test_records_reach_the_store_in_the_background(redis_conn):
    recorder = PredictionRecorder(lambda: CorrectionStore(redis_conn))
    recorder.submit(records(3))
    assert recorder.flush(10)
    assert recorder.written == 3 and recorder.dropped == 0
    mask, meta = CorrectionStore(redis_conn).prediction("3", 101, "cat")
    assert meta["prompt"] == "the cat 1" and meta["model_version"] == "v1" and mask.sum() == 12
    recorder.stop()


def test_redis_down_never_blocks_the_caller():
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5, socket_timeout=0.5)
    recorder = PredictionRecorder(lambda: CorrectionStore(dead), max_pending=4)
    started = time.perf_counter()
    recorder.submit(records(10))  # more than the queue holds: the oldest are dropped, nothing waits
    handed_over = time.perf_counter() - started
    assert recorder.flush(30)
    assert recorder.written == 0 and recorder.dropped == 10
    assert handed_over < 0.5  # ten records to a dead Redis would take >= 5 s of connect timeouts inline
    recorder.stop()
