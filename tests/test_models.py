"""The reference networks: shapes, input layouts, and inputs of the wrong size refused."""

import pytest
import torch

from effortless.models import MLP, CNN1d, LeNet


def test_lenet_takes_flat_or_image_inputs_in_any_layout_and_refuses_other_sizes():
    torch.manual_seed(0)
    net = LeNet().eval()
    img = torch.rand(3, 1, 28, 28)
    out = net(img)
    assert out.shape == (3, 10)
    torch.testing.assert_close(net(img.reshape(3, 784)), out)
    flat_t = img.reshape(3, 784).T.contiguous().T  # the same values, not contiguous (view failed)
    torch.testing.assert_close(net(flat_t), out)
    with pytest.raises(RuntimeError):  # view(-1, 1, 28, 28) made 6 images of these 3 rows
        net(torch.rand(3, 2 * 784))


def test_cnn1d_and_mlp_shapes():
    torch.manual_seed(0)
    cnn = CNN1d().eval()
    x = torch.rand(4, 40)
    assert cnn(x).shape == (4, 10)
    torch.testing.assert_close(cnn(x.T.contiguous().T), cnn(x))
    assert MLP(40, [16, 8], 3, dropout=0.1)(x).shape == (4, 3)


@pytest.mark.parametrize("args, kwargs, match", [((4, [16, 0], 3), {}, r"hidden\[1\]"),
                                                 ((4, [-1], 3), {}, r"hidden\[0\]"),
                                                 ((0, [4], 3), {}, "in_features"),
                                                 ((4, [4], 3), {"dropout": 1.0}, "dropout")])  # fmt: skip
def test_mlp_refuses_bad_widths_and_dropout_by_name(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(*args, **kwargs)
