"""The causal CNN computes only the steps its newest feature reads (`newest_features`): the
same latent as the whole stack's last step, alone and packed, forward and backward."""
import pytest
import torch

from pipeline.models.encoders import CNNEncoder, sparse_plan
from pipeline.models.packed import PackedCNNEncoder

CASES = [  # (lookback, kernel, dilations, channels in, residual)
    (90, 3, (1, 2, 4, 8, 16, 32), 3, True),       # the recipe's monthly CNN
    (36, 3, (1, 2, 4, 8, 16), 1, True),
    (20, 3, (1, 3, 5), 2, True),                  # not doubling: progressions of step 5
    (25, 2, (1, 2, 4, 8), 2, False),
    (7, 3, (1, 2, 4, 8), 2, True),                # the reach longer than the window
    (30, 4, (2, 6), 1, True),                     # no dilation 1
]


@pytest.mark.parametrize("length,kernel,dilations,c_in,residual", CASES)
def test_the_newest_feature_equals_the_whole_stacks(length, kernel, dilations, c_in, residual):
    torch.manual_seed(0)
    enc = CNNEncoder(c_in, hidden_size=8, kernel_size=kernel, dilations=dilations,
                     residual=residual)
    x = torch.randn(16, length, c_in, requires_grad=True)
    full = enc.features(x)[..., -1]                       # every step of every layer
    full.square().sum().backward()
    want = [x.grad.clone(), *[p.grad.clone() for p in enc.parameters()]]
    x.grad = None
    enc.zero_grad()
    got = enc(x).summary
    got.square().sum().backward()
    torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-6)
    for a, b in zip([x.grad, *[p.grad for p in enc.parameters()]], want, strict=True):
        # float sums in another order: within 1e-5 of the gradient's own size
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_the_plan_evaluates_half_the_steps_of_the_layer_below():
    # dilations 1, 2, …, 32 on 90 steps: 45 + 23 + 12 + 6 + 3 + 1 outputs, not 6 × 90
    assert sparse_plan(90, [3] * 6, [1, 2, 4, 8, 16, 32]) == [
        (1, 2, 45), (1, 2, 23), (1, 2, 12), (1, 2, 6), (1, 2, 3), (1, 1, 1)]
    # dilations 1, 3, 5: the second layer's outputs 5 steps apart, its taps 3 apart
    assert sparse_plan(20, [3] * 3, [1, 3, 5]) == [(1, 1, 17), (3, 5, 3), (1, 1, 1)]


def test_replicate_padding_stride_and_training_dropout_take_the_whole_stack():
    for kw in (dict(padding_mode="replicate"), dict(stride=2), dict(dropout=0.1)):
        enc = CNNEncoder(2, hidden_size=4, dilations=(1, 2), **kw)
        assert not all(layer.sparse_ok for layer in enc.layers), kw
    drop = CNNEncoder(2, hidden_size=4, dilations=(1, 2), dropout=0.1).eval()
    assert all(layer.sparse_ok for layer in drop.layers)  # no dropout drawn in eval mode
    x = torch.randn(3, 12, 2)
    torch.manual_seed(1)
    rep = CNNEncoder(2, hidden_size=4, dilations=(1, 2), padding_mode="replicate")
    assert torch.equal(rep(x).summary, rep.features(x)[..., -1])


@pytest.mark.parametrize("length,kernel,dilations,c_in,residual", CASES[:3])
def test_a_packed_cnn_equals_its_members(length, kernel, dilations, c_in, residual):
    torch.manual_seed(0)
    members = [CNNEncoder(c_in, hidden_size=8, kernel_size=kernel, dilations=dilations,
                          residual=residual) for _ in range(3)]
    packed = PackedCNNEncoder(members)
    x = torch.randn(3, 16, length, c_in)
    want = torch.stack([m.features(xg)[..., -1] for m, xg in zip(members, x, strict=True)])
    torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-6)
