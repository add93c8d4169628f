"""What share of a fine-tune's draws goes to which samples: the new corrections keep the share a first fine-tune
gives its corrections, however many the project sent before.

A fine-tune trains on all the project's corrections plus replayed base data, drawing each step's batch from that
mix. Drawn uniformly, a project's k-th fine-tune spends only ~1/k of its draws on the corrections its parent has
not learnt yet: with FINETUNE_EVERY=30 the fifth fine-tune of a project saw each new correction a fifth as often
as the first did, and learnt its new concept from 0 to 0.55-0.64 mIoU where the first reached 0.79
(docs/loop.md, "The forgetting budget, measured").

The rule (`mix_shares`): corrections newer than the parent version (seq above the watermark it was trained to) are
what the job is for; the corrections the parent already learnt are, from now on, knowledge to keep, like the base
replay. So

    share(new)        = 1 / (1 + REPLAY_RATIO)       the share of the corrections in a first fine-tune
    share(learnt)     = (1 - share(new)) x n_learnt / (n_learnt + n_replay)
    share(replay)     = (1 - share(new)) x n_replay / (n_learnt + n_replay)

and within a group every sample is equally likely. A first fine-tune (nothing learnt yet) gets exactly the uniform
mix it had before (its replay is REPLAY_RATIO x its corrections). Without replay (REPLAY_RATIO 0, or no source)
there is no ratio to rehearse at and the mix stays uniform over all corrections. The number of steps does not grow
with the project's history, so a fine-tune costs the same in week one and week ten; the forgetting budget is still
the gate's (finetune.gate): a mix that forgets more than it may is rejected, not promoted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from finetune.samples import ReferringSample

SEQ = "seq"  # meta key of a correction sample: its ingest sequence number (finetune.corrections)


@dataclass(frozen=True)
class MixShares:
    """Draw probabilities per group (they sum to 1 over the groups that have samples)."""

    new: float
    learnt: float
    replay: float

    def uniform(self, n_new: int, n_learnt: int, n_replay: int) -> bool:
        """Whether these shares are what drawing uniformly over all the samples gives."""
        total = n_new + n_learnt + n_replay
        return total > 0 and all(abs(share - n / total) < 1e-9 for share, n in
                                 ((self.new, n_new), (self.learnt, n_learnt), (self.replay, n_replay)))


def mix_shares(n_new: int, n_learnt: int, n_replay: int, replay_ratio: float) -> MixShares:
    """The share of the draws of each group (the module docstring's rule).

    Args:
        n_new: training corrections the parent was not trained on.
        n_learnt: training corrections the parent was trained on.
        n_replay: replayed base samples.
        replay_ratio: REPLAY_RATIO, replayed samples per correction (what a first fine-tune mixes at).
    """
    if min(n_new, n_learnt, n_replay) < 0 or n_new + n_learnt + n_replay == 0:
        raise ValueError(f"no samples to mix (new {n_new}, learnt {n_learnt}, replay {n_replay})")
    total = n_new + n_learnt + n_replay
    rehearsal = n_learnt + n_replay
    if n_new == 0 or n_learnt == 0 or n_replay == 0 or replay_ratio <= 0:
        # nothing new (a re-run), nothing learnt (a first fine-tune: its replay is the ratio already) or no
        # replay to rehearse at a ratio: uniform over everything
        return MixShares(n_new / total, n_learnt / total, n_replay / total)
    new = max(1.0 / (1.0 + replay_ratio), n_new / total)  # never less than the uniform share
    return MixShares(new, (1 - new) * n_learnt / rehearsal, (1 - new) * n_replay / rehearsal)


def split_new(train: Sequence[ReferringSample], trained_upto: int | None) -> tuple[list[ReferringSample], list[ReferringSample]]:
    """(new, learnt) training corrections: learnt = seq <= `trained_upto`, the watermark the parent version was
    trained to (None: unknown, e.g. a version from before it was recorded: all count as new)."""
    if trained_upto is None:
        return list(train), []
    new = [s for s in train if int(s.meta.get(SEQ, 0)) > trained_upto]
    learnt = [s for s in train if int(s.meta.get(SEQ, 0)) <= trained_upto]
    return new, learnt


def sample_weights(new: Sequence[ReferringSample], learnt: Sequence[ReferringSample],
                   replay: Sequence[ReferringSample], replay_ratio: float) -> tuple[list[ReferringSample], list[float] | None, MixShares]:
    """(samples, weights, shares): the training mix in the order new, learnt, replay; `weights` is each sample's
    draw probability, or None where the shares are the uniform ones (then draw uniformly, as a first fine-tune)."""
    shares = mix_shares(len(new), len(learnt), len(replay), replay_ratio)
    samples = [*new, *learnt, *replay]
    if shares.uniform(len(new), len(learnt), len(replay)):
        return samples, None, shares
    weights = ([shares.new / len(new)] * len(new) + [shares.learnt / max(1, len(learnt))] * len(learnt)
               + [shares.replay / max(1, len(replay))] * len(replay))
    return samples, weights, shares
