"""The fine-tune's training mix (finetune.mixing): the corrections newer than the parent keep the share a first
fine-tune gives its corrections, however long the project's history; and the real job, run twice in one project,
records which corrections were new and draws them at that share."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipseg_model.loading import load_model
from finetune.mixing import SEQ, mix_shares, sample_weights, split_new
from finetune.samples import ReferringSample
from finetune.spec import FinetuneSpec


def _sample(seq: int, source: str = "correction") -> ReferringSample:
    return ReferringSample(Image.new("RGB", (4, 4)), "the cat", np.zeros((4, 4), bool), source, {SEQ: seq} if source == "correction" else {})


@pytest.mark.parametrize("n_learnt", [24, 96, 960])
def test_new_corrections_keep_the_first_fine_tunes_share_however_many_came_before(n_learnt):
    """Issue 27: round k's 24 new corrections are drawn 1/(1+ratio) of the time (the share a first fine-tune gives
    its 24), not 24 / (all corrections x (1+ratio)) as uniform drawing gave (1/14 in round 2, 1/35 in round 5)."""
    ratio = 6.0
    n_new = 24
    n_replay = round((n_new + n_learnt) * ratio)
    first = mix_shares(n_new, 0, round(n_new * ratio), ratio)
    later = mix_shares(n_new, n_learnt, n_replay, ratio)
    assert first.new == pytest.approx(1 / 7) and first.learnt == 0
    assert later.new == pytest.approx(first.new)
    assert later.new > n_new / (n_new + n_learnt + n_replay)  # more than uniform drawing gives them
    assert later.new + later.learnt + later.replay == pytest.approx(1.0)
    # what the parent knew (its corrections, the base data) shares the rest in proportion to its size
    assert later.learnt / later.replay == pytest.approx(n_learnt / n_replay)


def test_uniform_where_there_is_nothing_to_rebalance():
    """A first fine-tune, a re-run with nothing new, and replay off draw uniformly, as before the rule."""
    assert mix_shares(24, 0, 144, 6.0).uniform(24, 0, 144)
    assert mix_shares(0, 24, 144, 6.0).uniform(0, 24, 144)
    assert mix_shares(24, 96, 0, 0.0).uniform(24, 96, 0)
    # many new corrections after a small parent: never less than their uniform share
    big = mix_shares(500, 10, 3060, 6.0)
    assert big.new >= 500 / 3570 and big.new == pytest.approx(max(1 / 7, 500 / 3570))
    with pytest.raises(ValueError):
        mix_shares(0, 0, 0, 6.0)


def test_split_new_by_the_parents_watermark_and_weights_per_sample():
    train = [_sample(seq) for seq in (3, 7, 30, 31, 55)]
    new, learnt = split_new(train, 30)
    assert [s.meta[SEQ] for s in new] == [31, 55] and [s.meta[SEQ] for s in learnt] == [3, 7, 30]
    assert split_new(train, None) == (train, [])  # unknown watermark: everything is new
    replay = [_sample(0, "shapes") for _ in range(30)]
    samples, weights, shares = sample_weights(new, learnt, replay, 6.0)
    assert samples[:2] == new and len(samples) == len(weights) == 35
    assert sum(weights[:2]) == pytest.approx(shares.new) == pytest.approx(1 / 7)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] > weights[2] > 0  # a new correction is drawn more often than a learnt one
    assert sample_weights(train, [], replay, 6.0)[1] is None  # uniform: drawn as before


def test_train_candidate_draws_by_the_weights(tiny_model_factory):
    """Weights 1, 0, 0, ... train on the first sample only: the same losses as a mix that holds only it."""
    from finetune.jobs import train_candidate
    from tests.test_training import _samples

    data = list(_samples(6, seed=3))
    factory = tiny_model_factory("tiny-clipseg")
    only = train_candidate(load_model(factory, "cpu"), data[:1], steps=5, batch_size=2, lr=3e-3, seed=4)
    weighted = train_candidate(load_model(factory, "cpu"), data, steps=5, batch_size=2, lr=3e-3, seed=4,
                               weights=[1.0] + [0.0] * 5)
    uniform = train_candidate(load_model(factory, "cpu"), data, steps=5, batch_size=2, lr=3e-3, seed=4)
    np.testing.assert_allclose(weighted, only, rtol=1e-6)
    assert not np.allclose(uniform, only)
    with pytest.raises(ValueError, match="weights"):
        train_candidate(load_model(factory, "cpu"), data, steps=1, weights=[1.0])


def test_second_fine_tune_draws_its_new_corrections_at_the_first_ones_share(redis_conn, redis_url, tiny_model_factory,
                                                                           tmp_path):
    """The real job twice in one project: the first records the watermark it trained to; the second, from it,
    counts only the corrections after it as new and draws them 1/(1+ratio) of the time (uniform: ~1/4 here)."""
    from finetune.corrections import CorrectionStore, Region
    from finetune.jobs import finetune_project
    from finetune.worker import WorkerContext
    from finetune.versions import VersionRegistry
    from tests.fixtures.webhooks import scene

    store, registry = CorrectionStore(redis_conn), VersionRegistry(redis_conn)

    def send(first: int, count: int) -> None:
        for i in range(first, first + count):
            jpeg, mask = scene(96, 64, seed=i)
            store.put_annotation(4, i + 1, 700 + i, [Region("cat", mask, "cat")], jpeg)

    WorkerContext.install(tmp_path / "data", "cpu")
    spec = FinetuneSpec("4", base_model=str(tiny_model_factory("tiny-clipseg")), steps=6, lr=3e-3, min_evidence=3,
                        threshold_min_samples=3, promote_epsilon=1.0, replay_ratio=1.0)
    send(0, 12)
    one = registry.get(finetune_project("4", spec.to_dict(), redis_url=redis_url)["version"])
    assert one.samples["trained_upto"] == 12 and one.samples["new_corrections"] == one.samples["corrections"]
    assert one.metrics["mix"]["learnt"] == 0 and one.metrics["mix"]["share_new"] == pytest.approx(0.5)
    registry.activate(one.version, "promoted", "the parent of the next fine-tune", project="4")
    send(12, 12)
    two = registry.get(finetune_project("4", spec.to_dict(), redis_url=redis_url)["version"])
    assert two.parent == one.version and two.samples["trained_upto"] == 24
    mix = two.metrics["mix"]
    assert mix["learnt"] == one.samples["corrections"] and mix["new"] == two.samples["corrections"] - mix["learnt"] > 0
    assert mix["share_new"] == pytest.approx(0.5)  # uniform drawing would give new / (2 x all) < 0.3
    assert mix["new"] / (2 * two.samples["corrections"]) < 0.3


def test_the_fine_tune_mixes_visual_prompts_in_at_the_specs_ratio(redis_conn, redis_url, tiny_model_factory, tmp_path):
    """FinetuneSpec.visual_prompt_ratio (FINETUNE_VISUAL_PROMPT_RATIO) reaches the job's training loop: with 1 every
    drawn correction is conditioned on its own target's crop (other losses than the phrases' from the same start),
    the version record counts them; 0 (the default) is the text-only loop, unchanged."""
    from backend.settings import Settings
    from finetune.corrections import CorrectionStore, Region
    from finetune.jobs import FINETUNE_RECIPE, finetune_project, train_candidate
    from finetune.worker import WorkerContext
    from finetune.versions import VersionRegistry
    from tests.fixtures.webhooks import scene
    from tests.test_training import _samples

    factory = tiny_model_factory("tiny-seed")
    data = list(_samples(6, seed=3))
    stats: dict[str, int] = {}
    text = train_candidate(load_model(factory, "cpu"), data, steps=3, batch_size=2, lr=3e-3, seed=4)
    zero = train_candidate(load_model(factory, "cpu"), data, steps=3, batch_size=2, lr=3e-3, seed=4,
                           recipe=FINETUNE_RECIPE.replace(visual_prompt_ratio=0.0), stats=stats)
    assert zero == text and stats["visual_prompts"] == 0
    visual = train_candidate(load_model(factory, "cpu"), data, steps=3, batch_size=2, lr=3e-3, seed=4,
                             recipe=FINETUNE_RECIPE.replace(visual_prompt_ratio=1.0), stats=stats)
    assert stats["visual_prompts"] == 6 and not np.allclose(visual, text)

    store = CorrectionStore(redis_conn)
    for i in range(8):
        jpeg, mask = scene(96, 64, seed=i)
        store.put_annotation(5, i + 1, 800 + i, [Region("cat", mask, "cat")], jpeg)
    WorkerContext.install(tmp_path / "data", "cpu")
    spec = FinetuneSpec("5", base_model=str(factory), steps=3, lr=3e-3, min_evidence=3, threshold_min_samples=3,
                        promote_epsilon=1.0, replay="none", visual_prompt_ratio=1.0)
    assert Settings(finetune_visual_ratio=0.5).finetune_spec("5").visual_prompt_ratio == 0.5
    record = VersionRegistry(redis_conn).get(finetune_project("5", spec.to_dict(), redis_url=redis_url)["version"])
    assert record.metrics["visual_prompt_ratio"] == 1.0 and record.metrics["visual_prompts"] == 3 * spec.batch_size
