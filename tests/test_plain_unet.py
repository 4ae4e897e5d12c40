"""The plain U-Net baseline: structure, padding/cropping and memory formats."""
import pytest
import torch

from e3fast.models import PlainUNet


def test_widths_double_per_level():
    model = PlainUNet(1, 4, features=6, n_downsample=2, kernel_size=3)
    widths = [block[0].out_channels for block in model.down_blocks]
    assert widths == [6, 12, 24]
    assert [block[0].in_channels for block in model.up_blocks] == [24 + 12, 12 + 6]
    assert model.out.out_channels == 4


@pytest.mark.parametrize("shape", [(8, 8, 8), (7, 9, 6)])
def test_output_has_input_spatial_shape(shape):
    model = PlainUNet(2, 3, features=4, n_downsample=2, kernel_size=3)
    y = model(torch.randn(2, 2, *shape))
    assert y.shape == (2, 3, *shape)


def test_padded_input_is_cropped_back():
    """An input padded at the start of each axis gives the padded network's output, cropped."""
    model = PlainUNet(1, 2, features=4, n_downsample=1, kernel_size=3)
    x = torch.randn(1, 1, 5, 6, 7)
    padded = torch.nn.functional.pad(x, (1, 0, 0, 0, 1, 0))
    torch.testing.assert_close(model(x), model(padded)[..., 1:, :, 1:])


def test_channels_last_matches_contiguous():
    model = PlainUNet(1, 2, features=8, n_downsample=2, kernel_size=3)
    x = torch.randn(1, 1, 16, 16, 16)
    expected = model(x)
    model_cl = model.to(memory_format=torch.channels_last_3d)
    y = model_cl(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        PlainUNet(1, 1, kernel_size=4)
