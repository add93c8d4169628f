"""Row h of `clipseg bench`: per-project models, i.e. the memory of many projects' decoders over one backbone and
the cost of switching between two of them."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.inference.common import PROMPTS, Report, Row, interleaved

PROJECTS = 50  # projects whose decoders one server holds in row h
SWITCHES = 20  # timed state copies in row h.switch


class _ProjectRegistry:
    """The part of `finetune.versions.VersionRegistry` a `ServingModel` reads, in memory: one fine-tuned version per
    project (row h needs no Redis; what is measured is the server's own loading and holding of the states)."""

    def __init__(self, checkpoints: dict[str, Path]):
        from finetune.versions import VersionRecord

        self.records = {f"v-{p}": VersionRecord(f"v-{p}", str(path), project=p) for p, path in checkpoints.items()}
        self.conn = None

    def pointers(self):
        return None, {r.project: (r.version, r.path) for r in self.records.values()}

    def get(self, version: str):
        return self.records[version]

    def lineage(self, version: str):
        return [self.records[version]]

    def materialize(self, version: str, models_dir) -> str:
        return self.records[version].path

    def mark_broken(self, version: str, reason: str) -> None:
        raise RuntimeError(f"version {version} did not load: {reason}")


def bench_projects(report: Report, model_dir: Path, work_dir: Path, image, repeats: int,
                   projects: int = PROJECTS) -> None:
    """(h) per-project models: RSS of a serving process holding `projects` (50) projects' decoders vs 1 (each state
    loaded through `ServingModel` from its own checkpoint), and the cost of switching decoders between requests
    of two projects on a cached image vs a cold request."""
    import gc

    import psutil
    import torch

    from backend.serving.model import ServingModel
    from clipseg_model.checkpoint import save_checkpoint
    from clipseg_model.loading import load_model

    checkpoints: dict[str, Path] = {}
    template = load_model(str(model_dir), "cpu")
    for i in range(projects):
        path = work_dir / f"projects-{model_dir.name}" / f"p{i}"
        if not (path / "clipseg_config.json").is_file():
            with torch.no_grad():
                for param in template.trainable_parameters():
                    param.add_(1e-3 * torch.randn_like(param))
            save_checkpoint(template, path, {"version": f"v-p{i}"}, replace=True)
        checkpoints[f"p{i}"] = path
    del template
    registry = _ProjectRegistry(checkpoints)
    serving = ServingModel(str(model_dir), "cpu", registry_factory=lambda: registry, models_dir=str(work_dir))
    serving._load_backbone()
    if not serving.ready:
        raise RuntimeError(serving.error)
    process = psutil.Process()

    def rss() -> int:
        gc.collect()
        return process.memory_info().rss

    first = serving.for_project("p0")
    first.predict(image, [PROMPTS[0]])  # every weight touched once: resident, as in a serving process
    rss_one = rss()
    started = time.perf_counter()
    views = [serving.for_project(p) for p in checkpoints]
    load_s = (time.perf_counter() - started) / (projects - 1)
    rss_all = rss()
    assert {v.version for v in views} == {f"v-{p}" for p in checkpoints} and first.version == "v-p0"
    state_mb = views[0].state.nbytes / 2**20
    growth_mb = (rss_all - rss_one) / (projects - 1) / 2**20
    # The allocator may place states in memory freed earlier (RSS grows less than what is held): count the larger.
    per_project_mb = max(growth_mb, state_mb)
    report.add(Row("h.rss", f"server RSS per project, {projects} projects' decoders loaded vs 1", per_project_mb, " MB",
                   "≤ 10 MB", per_project_mb <= 10,
                   f"RSS {rss_one / 2**30:.2f} GB with 1, {rss_all / 2**30:.2f} GB with {projects} "
                   f"(+{growth_mb:.1f} MB each); one state holds {state_mb:.1f} MB; loading a state {load_s * 1e3:.0f} ms"))

    segmenter = serving.segmenter
    a, b = serving.for_project("p1"), serving.for_project("p2")
    prompt = [PROMPTS[0]]
    a.predict(image, prompt)  # image features and the phrase cached: what remains is decoding (and switching)

    def cold():
        segmenter.feature_cache.clear()
        return a.predict(image, prompt)

    def same():
        return a.predict(image, prompt)

    def switching():
        b.predict(image, prompt)
        return a.predict(image, prompt)

    got = interleaved({"cold": cold, "same": same, "switch": switching}, max(repeats, 3))
    t_cold, t_same = statistics.median(got["cold"]), statistics.median(got["same"])
    t_switch = statistics.median(got["switch"]) / 2  # two requests, each after a switch
    # What a switch adds is the copy of a state into the backbone (`load_trainable_state`, which every switching
    # request runs once). It is timed itself, over many switches: the difference of the two request medians above
    # is smaller than their noise and came out negative (then clamped to 0) under load.
    switches_before = segmenter.state_switches
    t_copy = _median_switch(segmenter.model, a.state, b.state, SWITCHES)
    share = t_copy / t_cold
    report.timings["project_switch"] = got
    report.add(Row("h.switch", "cost of switching two projects' decoders per cached-image request / cold", share * 100,
                   "%", "≤ 5%", share <= 0.05,
                   f"a switch {t_copy * 1e3:.2f} ms (median of {SWITCHES}), cold {t_cold * 1e3:.0f} ms; requests: "
                   f"cached {t_same * 1e3:.1f} ms, after a switch {t_switch * 1e3:.1f} ms; "
                   f"{switches_before} switches by requests"))
    serving.stop()



def _median_switch(model, first, second, switches: int) -> float:
    """Median seconds of copying a project's trainable state into `model` (first, second, first, ...): what a
    request of another project than the last one adds. The model holds `first` afterwards."""
    import torch

    live = model.trainable_tensors()
    samples = []
    with torch.inference_mode():
        for i in range(switches):
            state = second if i % 2 == 0 else first
            started = time.perf_counter()
            model.load_trainable_state(state, live)
            samples.append(time.perf_counter() - started)
        model.load_trainable_state(first, live)
    return statistics.median(samples)
