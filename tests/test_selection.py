"""Clean-sample selection: the mixture fit against scikit-learn, degenerate batches, refill."""

import warnings

import numpy as np
import pytest
import torch
from helpers import needs_kernels
from omegaconf import OmegaConf
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import tadfkd.distillation.selection
from tadfkd.base.errors import UserError
from tadfkd.bench.published import PUBLISHED_STYLE
from tadfkd.distillation.selection import (
    GMMSelection,
    NoSelection,
    _m_step,
    _two_means_split,
    clean_posterior,
    fill_order,
    fit_two_gaussians,
    minmax_normalise,
    pseudo_label_loss,
)
from tadfkd.models import kernels
from tadfkd.run.builder import build_selection


def teacher_like_logits(rng: np.random.Generator, n: int, classes: int = 10) -> torch.Tensor:
    """Logits of a teacher on generated samples: a confident majority and a noisy tail."""
    confident = rng.random(n) < rng.uniform(0.3, 0.9)
    scale = np.where(confident, rng.uniform(4, 10, n), rng.uniform(0.2, 2, n))[:, None]
    logits = rng.normal(size=(n, classes)) * scale
    return torch.tensor(logits, dtype=torch.float32)


def sklearn_keep(losses: torch.Tensor, threshold: float, seed: int) -> np.ndarray:
    """The reference's selection: scikit-learn GaussianMixture on min-max normalised losses."""
    x = minmax_normalise(losses.double().numpy()).reshape(-1, 1)
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
    # and our fit is at least as close to it as that.
    assert ours_vs_reference >= reference_vs_itself


def test_chunks_are_fitted_independently():
    rng = np.random.default_rng(1)
    losses = torch.tensor(rng.gamma(2.0, 0.5, size=(6, 128)))
    together = clean_posterior(losses)
    assert together.dtype == torch.float32
    for row, posterior in zip(losses, together, strict=True):
        torch.testing.assert_close(posterior, clean_posterior(row.view(1, -1))[0])


@pytest.mark.gpu
def test_the_fit_of_cuda_losses_comes_back_on_cuda_equal_to_the_cpus():
    losses = torch.tensor(np.random.default_rng(4).gamma(2.0, 0.5, size=(3, 64)))
    on_cuda = clean_posterior(losses.cuda())
    assert on_cuda.is_cuda and on_cuda.dtype == torch.float32
    torch.testing.assert_close(on_cuda.cpu(), clean_posterior(losses), rtol=0, atol=0)


def test_from_the_same_start_the_fit_is_scikit_learns_em():
    # scikit-learn started from our initial mixture (the 2-means split) runs the same rounds and
    # stops at the same one: posteriors equal to float64 rounding
    rng = np.random.default_rng(2)
    stopped_early = 0
    for _ in range(60):
        losses, _ = pseudo_label_loss(teacher_like_logits(rng, 64))
        x = minmax_normalise(losses.double().numpy())
        upper = _two_means_split(x).astype(np.float64)
        weights, means, variances = _m_step(x, (1.0 - upper, upper), 5e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gmm = GaussianMixture(
                n_components=2,
                max_iter=10,
                tol=1e-2,
                reg_covar=5e-4,
                weights_init=weights,
                means_init=np.array(means).reshape(2, 1),
                precisions_init=(1.0 / np.array(variances)).reshape(2, 1, 1),
            ).fit(x.reshape(-1, 1))
        stopped_early += gmm.n_iter_ < 10
        reference = gmm.predict_proba(x.reshape(-1, 1))[:, gmm.means_.argmin()]
        np.testing.assert_allclose(fit_two_gaussians(x), reference, rtol=0, atol=1e-9)
    assert stopped_early > 0  # the stop at tol was exercised


def test_max_iter_bounds_the_rounds(monkeypatch):
    rng = np.random.default_rng(3)
    x = minmax_normalise(rng.gamma(2.0, 0.5, size=64))
    rounds = []
    e_step = tadfkd.distillation.selection._e_step
    monkeypatch.setattr(
        tadfkd.distillation.selection, "_e_step", lambda *args: rounds.append(1) or e_step(*args)
    )
    for max_iter, tol, expected in ((3, 1e-9, 4), (10, 1e-9, 11), (10, 1e-2, None)):
        rounds.clear()
        fit_two_gaussians(x, max_iter=max_iter, tol=tol)
        if expected is None:
            assert len(rounds) < 11  # it converged before max_iter, as scikit-learn stops
        else:
            assert len(rounds) == expected  # every round, then the final E-step


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


def test_a_covariance_regulariser_that_is_not_positive_is_refused():
    # without it a component of equal values has variance 0 and no log-likelihood
    for bad in (0.0, -1e-4):
        with pytest.raises(UserError, match="selection.reg_covar"):
            GMMSelection(reg_covar=bad)


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


def test_the_agreement_yardstick_is_the_published_fit_from_seeded_random_starts(capsys):
    # --agreement's yardstick: scikit-learn's mixture (the published fit) from 4 seeded random
    # starts on the same scores; how often two starts agree, and how often our fit agrees
    from omegaconf import OmegaConf

    from tadfkd.bench.agreement import published_fit_yardstick

    rng = np.random.default_rng(5)
    logits = teacher_like_logits(rng, 12 * 64).view(12, 64, 10)
    ours = GMMSelection(threshold=0.5).keep_mask(logits.flatten(0, 1), 64).numpy()
    selection = OmegaConf.create({"threshold": 0.5, "max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4})
    shares = published_fit_yardstick(OmegaConf.create({"selection": selection}), logits, ours)
    starts = []
    for seed in range(4):
        stream = np.random.RandomState(seed)  # one stream of starts, a fit per batch
        masks = []
        for row in logits:
            x = minmax_normalise(pseudo_label_loss(row)[0].double().numpy()).reshape(-1, 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                mixture = GaussianMixture(
                    n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=stream
                ).fit(x)
            masks.append(mixture.predict_proba(x)[:, mixture.means_.argmin()] > 0.5)
        starts.append(np.concatenate(masks))
    between = [(starts[i] == starts[j]).mean() for i in range(4) for j in range(i + 1, 4)]
    assert shares["published fit, another start"] == pytest.approx(np.mean(between))
    assert shares["this fit against the published fit"] == pytest.approx(
        np.mean([(ours == mask).mean() for mask in starts])
    )
    # the starts disagree on some samples: the published selection is itself random
    assert 0.9 < shares["published fit, another start"] < 1.0
    assert "the published fit from 4 random starts" in capsys.readouterr().out


@needs_kernels
@pytest.mark.parametrize("size", [2, 7, 64, 100, 300])
def test_the_fit_in_c_is_numpys_fit_bit_for_bit(size):
    """``speed.mixture_kernel``: the same float64 operations and numpy's pairwise sums give the
    same float32 posteriors, including the rows that keep everything."""
    rng = np.random.default_rng(size)
    for scale in (0.3, 1.0, 4.0):
        losses = torch.from_numpy(rng.gamma(2.0, scale, (40, size))).float()
        losses[0] = 0.7  # all equal: posterior 1
        losses[1, 0] = float("nan")  # a NaN: posterior 1
        by_c = clean_posterior(losses, by_kernel=True)
        assert torch.equal(by_c, clean_posterior(losses, by_kernel=False))
        assert by_c[:2].eq(1.0).all() and by_c[2:].lt(1.0).any()


@needs_kernels
def test_the_selection_keeps_the_same_samples_with_the_fit_in_c(kernel_calls):
    rng = np.random.default_rng(3)
    logits = teacher_like_logits(rng, 64 * 20)
    by_c, by_numpy = GMMSelection(), GMMSelection()
    by_c.by_kernel = True
    assert torch.equal(by_c.keep_mask(logits, 64), by_numpy.keep_mask(logits, 64))
    assert kernel_calls == ["two_gaussian_posterior"]
    clean_posterior(torch.rand(3, 1), by_kernel=True)  # one sample a chunk: numpy's path
    assert kernel_calls == ["two_gaussian_posterior"]


def test_the_builder_fits_in_c_where_the_kernels_build(monkeypatch):
    speed = OmegaConf.create({"mixture_kernel": "auto"})
    node = OmegaConf.create({"_target_": "tadfkd.distillation.selection.GMMSelection"})
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: None)
    assert build_selection(node, speed).by_kernel is True
    speed.mixture_kernel = False
    assert build_selection(node, speed).by_kernel is False
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no C compiler (cc) on the PATH")
    speed.mixture_kernel = "auto"
    assert build_selection(node, speed).by_kernel is False
    speed.mixture_kernel = True
    with pytest.raises(UserError, match=r"speed.mixture_kernel=true needs the C kernels"):
        build_selection(node, speed)
    published = {"_target_": "tadfkd.bench.published.ScikitLearnGMMSelection"}
    speed.mixture_kernel = False  # as the published-style path sets it (PUBLISHED_STYLE)
    assert "speed.mixture_kernel=false" in PUBLISHED_STYLE
    assert build_selection(OmegaConf.create(published), speed).by_kernel is False
    none = OmegaConf.create({"_target_": "tadfkd.distillation.selection.NoSelection"})
    assert isinstance(build_selection(none, speed), NoSelection)  # nothing to fit: no error
