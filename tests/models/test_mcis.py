"""The co-attention module's identities."""
import torch

from ray_wsss.models.mcis import CoAttention

C = 5


def feats(seed, b=2, h=3, w=4):
    return torch.randn(b, C, h, w, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def module(W=None):
    co = CoAttention(C, 3).double()
    if W is not None:
        with torch.no_grad():
            co.W_P.weight.copy_(W)
    return co


def test_shapes_and_the_softmax_axes():
    co = module(torch.randn(C, C, dtype=torch.float64))
    fm, fn = feats(0), feats(1, h=5, w=2)
    am, an = co(fm, fn)
    assert am.shape == fm.shape and an.shape == fn.shape
    p = co.affinity(fm, fn)                              # (B, HW_m, HW_n)
    assert p.shape == (2, 12, 10)
    # reference: explicit P = F_m^T W F_n and both softmaxes
    W = co.W_P.weight
    for i in range(2):
        Fm, Fn = fm[i].reshape(C, -1), fn[i].reshape(C, -1)
        P = Fm.T @ W.T @ Fn                               # nn.Linear applies x W^T
        torch.testing.assert_close(p[i], P)
        A = torch.softmax(P, dim=0)                       # over m's positions
        B = torch.softmax(P, dim=1)                       # over n's positions
        torch.testing.assert_close(A.sum(0), torch.ones(10, dtype=A.dtype))
        torch.testing.assert_close(B.sum(1), torch.ones(12, dtype=B.dtype))
        torch.testing.assert_close(an[i].reshape(C, -1), Fm @ A)
        torch.testing.assert_close(am[i].reshape(C, -1), Fn @ B.T)


def test_swapping_the_images_swaps_the_outputs():
    W = torch.randn(C, C, dtype=torch.float64)
    co = module(W + W.T)  # P(n, m) = P(m, n)^T needs a symmetric W_P (its identity init is)
    fm, fn = feats(2), feats(3, h=2, w=3)
    am, an = co(fm, fn)
    bn, bm = co(fn, fm)
    torch.testing.assert_close(am, bm)
    torch.testing.assert_close(an, bn)


def test_zero_W_P_gives_uniform_attention():
    co = module(torch.zeros(C, C, dtype=torch.float64))
    fm, fn = feats(4), feats(5, h=5, w=2)
    am, an = co(fm, fn)
    # every attended feature is the mean of the other image's features
    torch.testing.assert_close(an, fm.mean(dim=(2, 3), keepdim=True).expand_as(fn))
    torch.testing.assert_close(am, fn.mean(dim=(2, 3), keepdim=True).expand_as(fm))


def test_complement_and_logits():
    co = module()
    fm = feats(6)
    with torch.no_grad():
        co.gate.weight.zero_()  # sigmoid(0) = 1/2: half of every feature remains
    torch.testing.assert_close(co.complement(fm, fm), fm / 2)
    assert co.logits(fm).shape == (2, 3)
