"""The two views of a generated batch."""

import torch

from tadfkd.data.views import Views


def test_test_view_is_per_channel_normalisation():
    views = Views(mean=[0.5, 0.25], std=[0.5, 0.25])
    x = torch.rand(3, 2, 8, 8)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.25], dim=1)
    torch.testing.assert_close(views.test_view(x), expected)


def test_train_view_is_one_crop_and_flip_for_the_whole_batch():
    views = Views(mean=[0.0], std=[1.0], crop_padding=4, flip=True)
    x = torch.rand(5, 1, 16, 16)
    found_shift = found_flip = False
    for seed in range(30):
        out = views.train_view(x, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        matches = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.equal(
                out,
                padded[..., top : top + 16, left : left + 16].flip(-1)
                if flip
                else padded[..., top : top + 16, left : left + 16],
            )
        ]
        assert matches, "every image of the batch shares one crop offset and one flip"
        found_shift |= any((t, lft) != (4, 4) for t, lft, _ in matches)
        found_flip |= any(f for *_, f in matches)
    assert found_shift and found_flip


def test_train_view_without_augmentation_equals_test_view():
    views = Views(mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], crop_padding=0, flip=False)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(views.train_view(x), views.test_view(x))


def test_gradients_reach_the_generator_output_through_the_train_view():
    views = Views(mean=[0.5], std=[0.5])
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    views.train_view(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
