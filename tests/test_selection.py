"""Clean-sample selection: torch mixture fit against scikit-learn, degenerate batches, refill."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import tadfkd.distillation.selection
from tadfkd.base.errors import UserError
from tadfkd.distillation.selection import (
    GMMSelection,
    NoSelection,
    clean_posterior,
    fill_order,
    fit_two_gaussians,
    minmax_normalise,
    pseudo_label_loss,
)


def teacher_like_logits(rng: np.random.Generator, n: int, classes: int = 10) -> torch.Tensor:
    """Logits of a teacher on generated samples: a confident majority and a noisy tail."""
    confident = rng.random(n) < rng.uniform(0.3, 0.9)
    scale = np.where(confident, rng.uniform(4, 10, n), rng.uniform(0.2, 2, n))[:, None]
    logits = rng.normal(size=(n, classes)) * scale
    return torch.tensor(logits, dtype=torch.float32)


def sklearn_keep(losses: torch.Tensor, threshold: float, seed: int) -> np.ndarray:
    """The reference's selection: scikit-learn GaussianMixture on min-max normalised losses."""
    x = minmax_normalise(losses.double().view(1, -1))[0].numpy().reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm = GaussianMixture(
            n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed
        ).fit(x)
    return gmm.predict_proba(x)[:, gmm.means_.argmin()] > threshold


def test_kept_sets_match_scikit_learn_on_many_random_batches():
    rng = np.random.default_rng(0)
    selection = GMMSelection(threshold=0.5)
    ours_vs_reference = reference_vs_itself = total = 0
    for seed in range(150):
        logits = teacher_like_logits(rng, 256)
        ours = selection.keep_mask(logits, 256).numpy()
        losses, _ = pseudo_label_loss(logits)
        reference = sklearn_keep(losses, 0.5, seed)
        ours_vs_reference += int((ours == reference).sum())
        reference_vs_itself += int((sklearn_keep(losses, 0.5, seed + 1000) == reference).sum())
        total += ours.size
    assert ours_vs_reference / total >= 0.99
    # scikit-learn's k-means++ start is random: with another seed it disagrees with itself too,
    # and the torch fit is at least as close to it as that.
    assert ours_vs_reference >= reference_vs_itself


def test_vectorised_chunks_equal_one_fit_per_chunk():
    rng = np.random.default_rng(1)
    losses = torch.tensor(rng.gamma(2.0, 0.5, size=(6, 128)))
    together = clean_posterior(losses)
    one_by_one = torch.cat([clean_posterior(row.view(1, -1)) for row in losses])
    torch.testing.assert_close(together, one_by_one)


def test_leaving_the_loop_once_every_chunk_converged_changes_nothing(monkeypatch):
    rng = np.random.default_rng(2)
    # at tol=1e-2 the chunks converge after different numbers of rounds (all within 4); at
    # tol=1e-9 none does in 10 rounds; max_iter=3 stops before all have converged
    losses = torch.tensor(rng.gamma(2.0, 0.5, size=(8, 64)))
    normalised = minmax_normalise(losses)
    rounds = []
    e_step = tadfkd.distillation.selection._e_step
    monkeypatch.setattr(
        tadfkd.distillation.selection,
        "_e_step",
        lambda *args: rounds.append(1) or e_step(*args),
    )
    for max_iter, tol in ((10, 1e-2), (10, 1e-9), (3, 1e-2)):
        rounds.clear()
        early = fit_two_gaussians(normalised, max_iter=max_iter, tol=tol, early_exit=True)
        early_rounds = len(rounds)
        rounds.clear()
        full = fit_two_gaussians(normalised, max_iter=max_iter, tol=tol, early_exit=False)
        assert torch.equal(early, full)
        assert len(rounds) == max_iter + 1  # every round, then the final E-step
        if (max_iter, tol) == (10, 1e-2):
            assert early_rounds < max_iter + 1  # it did leave early


def test_posterior_is_a_probability_and_favours_low_losses():
    rng = np.random.default_rng(2)
    low = rng.normal(0.05, 0.02, 100).clip(0)
    high = rng.normal(2.0, 0.3, 100)
    posterior = clean_posterior(torch.tensor(np.concatenate([low, high])).view(1, -1))[0]
    assert ((posterior >= 0) & (posterior <= 1)).all()
    assert (posterior[:100] > 0.5).all() and (posterior[100:] < 0.5).all()


def test_all_equal_losses_keep_every_sample_without_nan():
    logits = torch.zeros(64, 10)  # identical uniform predictions: every loss is log(10)
    keep = GMMSelection().keep_mask(logits, 64)
    assert keep.all()
    posterior = clean_posterior(torch.full((2, 32), 3.0))
    assert torch.isfinite(posterior).all() and (posterior == 1).all()


def test_pseudo_label_loss_is_minus_log_max_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    loss, labels = pseudo_label_loss(logits)
    expected = -torch.log_softmax(logits, dim=1).amax(dim=1)
    torch.testing.assert_close(loss, expected)
    assert labels.tolist() == [0, 0]


def test_threshold_outside_open_unit_interval_is_refused():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="selection.threshold"):
            GMMSelection(threshold=bad)


def test_no_selection_keeps_everything():
    assert NoSelection().keep_mask(torch.randn(7, 3), 7).all()


def test_fill_order_takes_earlier_batches_whole_and_samples_the_last():
    # Three batches of 4: kept 2, 1 and 3 samples; a student batch of 4 needs one of the last 3.
    keep = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    seen_from_last = set()
    for seed in range(40):
        index = fill_order(keep, 4, torch.Generator().manual_seed(seed))
        assert index.numel() == 4 and keep[index].all()
        assert {0, 2, 5} <= set(index.tolist())
        seen_from_last |= set(index.tolist()) - {0, 2, 5}
    assert seen_from_last == {8, 9, 11}  # the fill is drawn at random from the last batch


def test_fill_order_returns_fewer_when_too_few_were_kept():
    keep = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    assert sorted(fill_order(keep, 4).tolist()) == [1, 6]
    assert fill_order(torch.zeros(8, dtype=torch.bool), 4).numel() == 0
