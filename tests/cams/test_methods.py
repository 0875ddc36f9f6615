"""Every explaining method against a straightforward per-image, per-class reference:
autograd through the model for the gradient methods, explicit loops for Score-CAM and
the MinMax weights. Float64 models with random weights; maps agree to 1e-5 relative."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_wsss.cams.methods import METHODS, MethodOptions
from ray_wsss.cams.tta import tta_maps
from ray_wsss.models.classifier import Classifier, kernel_usage

K, C = 4, 6


class ConvBackbone(nn.Module):
    """A small random conv net at stride 4 (not a trained model: the maths is the point),
    with two stages (strides 2 and 4) for the fused LayerCAM."""
    out_channels = C

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.c2 = nn.Conv2d(8, C, 3, 2, 1)

    def forward_stages(self, x):
        s1 = F.relu(self.c1(x))
        return [s1, F.relu(self.c2(s1))]

    def forward(self, x):
        return self.forward_stages(x)[-1]


class SoftplusHead(Classifier):
    """s_c = mean_xy softplus((W A)_c): gradients vary over space, unlike GAP + linear."""

    def logits_from_features(self, feats):
        return F.softplus(torch.einsum("bchw,kc->bkhw", feats, self.head_weight())).mean((2, 3))


def make(cls=Classifier, seed=0, kur=False):
    torch.manual_seed(seed)
    m = cls(ConvBackbone(), K, mean=(120.0, 110.0, 100.0), std=(60.0, 60.0, 60.0), kur=kur)
    with torch.no_grad():
        m.classifier.weight.normal_()
    return m.double().eval()


def batch(seed=1, b=3, h=24, w=20):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64) * 255
    classes = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float64)[:b]
    return x, classes


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- references

def ref_grad(model, x, target_fn, head_only=False):
    """Per-image: features, the scalar target, its gradient dT/dA.

    As a hand-written Grad-CAM does it (pytorch-grad-cam's hooks): one forward through
    the whole model with autograd and a backward from the target through everything;
    `head_only` differentiates the head alone, on detached features."""
    if head_only:
        feats = model.features(x[None]).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(target_fn(model.logits_from_features(feats)[0]), feats)
        return feats.detach()[0], g[0]
    model.zero_grad(set_to_none=True)
    feats = model.features(x[None].clone().requires_grad_(True))
    feats.retain_grad()
    target_fn(model.logits_from_features(feats)[0]).backward()
    return feats.detach()[0], feats.grad[0]


def first_component_reference(P):
    """Eigen-CAM's projection computed another way: the top eigenvector of the channel
    covariance (eigh), same orientation rule (entries summing to >= 0). P (C, h, w)."""
    X = P.reshape(P.shape[0], -1).t()
    X = X - X.mean(0)
    _, vecs = torch.linalg.eigh(X.t() @ X)
    v = vecs[:, -1]
    if v.sum() < 0:
        v = -v
    return (X @ v).reshape(P.shape[1:])


def fullgrad_reference_map(model, x, u):
    """FullGrad of class u for one image x (3, H, W): hooks keep every biased layer's
    output, one backward through the whole model, then loops over layers."""
    outs = []
    handles = []

    def keep(bias):
        def hook(module, args, out):
            out.retain_grad()
            outs.append((out, bias.detach()))
        return hook

    for m in model.modules():
        bias = None
        if isinstance(m, nn.BatchNorm2d):
            bias = m.bias - m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps)
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            bias = m.bias
        if bias is not None:
            handles.append(m.register_forward_hook(keep(bias)))
    z = ((x[None] - model.mean) / model.std).detach().requires_grad_(True)
    s = model.logits_from_features(model.backbone(z))[0, u]
    for h in handles:
        h.remove()
    s.backward()
    H, W = x.shape[1:]

    def psi(t):  # (C, h, w) -> (H, W)
        a = t.abs()
        a = a - a.min()
        a = a / (a.max() + 1e-6)
        m = a.sum(0)[None, None]
        return F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[0, 0] \
            if m.shape[-2:] != (H, W) else m[0, 0]

    total = psi(z.grad[0] * z[0].detach())
    for o, bias in outs:
        total = total + psi(o.grad[0] * bias[:, None, None])
    return total - total.min()


def layercam_fused_reference_map(model, x, u, gamma):
    z = ((x[None] - model.mean) / model.std).detach().requires_grad_(True)
    stages = model.backbone.forward_stages(z)
    for a in stages:
        a.retain_grad()
    model.logits_from_features(stages[-1])[0, u].backward()
    size = stages[0].shape[2:]
    fused = None
    for a in stages:
        m = torch.zeros(a.shape[2:], dtype=a.dtype)
        for k in range(a.shape[1]):
            m += F.relu(a.grad[0, k]) * a[0, k].detach()
        m = F.relu(m)
        if m.max() > 0:
            m = m / m.max()
        m = torch.tanh(gamma * m)
        m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        fused = m if fused is None else torch.maximum(fused, m)
    return fused


def input_gradient_map(model, x, u):
    x = x[None].clone().requires_grad_(True)
    model(x)[0, u].backward()
    return x.grad[0].abs().amax(0)


def smoothgrad_reference_map(model, x, u, opts):
    gen = torch.Generator().manual_seed(opts.seed)
    sigma = opts.smoothgrad_noise * (x.max() - x.min())
    total = torch.zeros(x.shape[1:], dtype=x.dtype)
    for _ in range(opts.smoothgrad_samples):
        noise = torch.randn((1, *x.shape), generator=gen, dtype=x.dtype)[0]
        total += input_gradient_map(model, x + sigma * noise, u)
    return total / opts.smoothgrad_samples


INPUT_RESOLUTION = ("gradient", "smoothgrad", "fullgrad")


def reference(method, model, x, classes, opts=MethodOptions(), head_only=False):
    if method in INPUT_RESOLUTION:
        size = x.shape[2:]
    elif method == "layercam-fused":
        size = model.backbone.forward_stages((x[:1] - model.mean) / model.std)[0].shape[2:]
    else:
        size = model.features(x[:1]).shape[2:]
    out = torch.zeros(x.shape[0], classes.shape[1], *size, dtype=x.dtype)
    for b in range(x.shape[0]):
        D = [int(c) for c in torch.nonzero(classes[b]).flatten()]
        for u in D:
            if method == "gradient":
                out[b, u] = input_gradient_map(model, x[b], u)
                continue
            if method == "smoothgrad":
                out[b, u] = smoothgrad_reference_map(model, x[b], u, opts)
                continue
            if method == "fullgrad":
                out[b, u] = fullgrad_reference_map(model, x[b], u)
                continue
            if method == "layercam-fused":
                out[b, u] = layercam_fused_reference_map(model, x[b], u, opts.layercam_gamma)
                continue
            if method in ("hirescam", "xgradcam", "layercam", "eigengradcam"):
                A, g = ref_grad(model, x[b], lambda s, u=u: s[u], head_only)
                m = torch.zeros(A.shape[1:], dtype=A.dtype)
                if method == "eigengradcam":
                    m = first_component_reference(g * A)
                for k in range(A.shape[0]):
                    if method == "hirescam":
                        m += g[k] * A[k]
                    elif method == "layercam":
                        m += F.relu(g[k]) * A[k]
                    elif method == "xgradcam" and A[k].sum() != 0:
                        m += (A[k] * g[k]).sum() / A[k].sum() * A[k]
                out[b, u] = F.relu(m)
                continue
            if method in ("gradcam", "gradcampp", "minmax-gradcam"):
                if method == "minmax-gradcam":
                    def target(s, u=u):
                        rest = sum(s[d] for d in D if d != u) if len(D) > 1 else 0.0
                        return opts.lambda_pos * s[u] - opts.lambda_neg * rest / max(len(D) - 1, 1)
                else:
                    def target(s, u=u):
                        return s[u]
                A, g = ref_grad(model, x[b], target, head_only)
                if method == "gradcampp":
                    alpha = torch.zeros(A.shape[0], dtype=A.dtype)
                    for k in range(A.shape[0]):
                        num = g[k] ** 2
                        den = 2 * g[k] ** 2 + A[k].sum() * g[k] ** 3
                        a = torch.where(g[k] != 0, num / den, torch.zeros_like(num))
                        alpha[k] = (a * F.relu(g[k])).sum()
                else:
                    alpha = g.mean(dim=(1, 2))
                out[b, u] = F.relu((alpha[:, None, None] * A).sum(0))
                continue
            A = model.features(x[b:b + 1])[0]
            W = model.head_weight()
            if method == "cam":
                w = W[u]
            elif method == "minmax":
                w = opts.lambda_pos * W[u] - opts.lambda_neg * sum(
                    (W[d] for d in D if d != u), torch.zeros_like(W[u])) / max(len(D) - 1, 1)
            elif method == "d-minmax":
                rest = sum((W[d] for d in D if d != u), torch.zeros_like(W[u]))
                total = sum(W[d] for d in D)
                w = (opts.lambda_pos * F.relu(W[u])
                     - opts.lambda_neg * F.relu(rest) / max(len(D) - 1, 1)
                     + opts.lambda_bg * torch.clamp(total, max=0) / max(len(D), 1))
            elif method == "scorecam":
                scores = []
                for k in range(A.shape[0]):
                    up = F.interpolate(A[None, k:k + 1], size=x.shape[2:], mode="bilinear",
                                       align_corners=False)[0, 0]
                    m = (up - up.min()) / (up.max() - up.min()) if up.max() > up.min() \
                        else torch.zeros_like(up)
                    masked = model.mean[0] + (x[b] - model.mean[0]) * m
                    scores.append(model(masked[None])[0, u])
                w = torch.softmax(torch.stack(scores), 0)
            elif method == "eigencam":
                out[b, u] = F.relu(first_component_reference(A))
                continue
            elif method == "ablationcam":
                # one channel per pass: the head on the features with A_k zeroed
                s0 = model.logits_from_features(A[None])[0, u]
                w = torch.zeros(A.shape[0], dtype=A.dtype)
                for k in range(A.shape[0]):
                    ablated = A.clone()
                    ablated[k] = 0
                    w[k] = (s0 - model.logits_from_features(ablated[None])[0, u]) / s0
            out[b, u] = F.relu(torch.einsum("chw,c->hw", A, w))
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("cls", [Classifier, SoftplusHead], ids=["gap-linear", "softplus-head"])
def test_method_equals_the_per_image_per_class_reference(name, cls):
    model = make(cls)
    x, classes = batch()
    opts = MethodOptions(lambda_pos=1.3, lambda_neg=0.7, lambda_bg=0.9, scorecam_batch=4,
                         grad_chunk=2, ablation_batch=5, smoothgrad_samples=3, seed=7,
                         layercam_gamma=1.5)
    with torch.no_grad():
        maps, logits = METHODS[name](model, x, classes, opts)
        close(logits, model(x))
    close(maps, reference(name, model, x, classes, opts))
    assert maps.min() >= 0
    assert torch.all(maps[classes == 0] == 0)


@pytest.mark.parametrize("name", ["gradcam", "gradcampp", "minmax-gradcam"])
def test_head_only_gradients_equal_gradients_through_the_whole_model(name):
    """The batched methods differentiate the head alone; the reference goes through the
    whole model. ds/dA is the same either way."""
    model = make(SoftplusHead)
    x, classes = batch()
    close(reference(name, model, x, classes, head_only=True), reference(name, model, x, classes))


def _normalised(m):
    return m / m.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-30)


def test_cam_equals_gradcam_up_to_normalisation_for_gap_linear():
    model = make()
    x, classes = batch()
    cam, _ = METHODS["cam"](model, x, classes)
    grad, _ = METHODS["gradcam"](model, x, classes)
    h, w = cam.shape[-2:]
    close(grad * h * w, cam)  # dS/dA = W / (h w) for GAP + linear
    close(_normalised(grad[classes > 0]), _normalised(cam[classes > 0]))


def test_hirescam_equals_gradcam_for_gap_linear():
    """ds/dA = W / (h w) everywhere: the element-wise product sums to Grad-CAM's map."""
    model = make()
    x, classes = batch()
    close(METHODS["hirescam"](model, x, classes)[0], METHODS["gradcam"](model, x, classes)[0])


def test_layercam_at_the_last_stage_of_gap_linear_is_cam_of_the_positive_weights():
    """ReLU(ds/dA) = ReLU(W) / (h w): LayerCAM is CAM with the negative weights dropped,
    so CAM itself (up to normalisation) when the head's weights are >= 0."""
    model = make()
    x, classes = batch()
    layer, _ = METHODS["layercam"](model, x, classes)
    h, w = layer.shape[-2:]
    feats = model.features(x)
    expected = F.relu(torch.einsum("bchw,kc->bkhw", feats, F.relu(model.head_weight())))
    close(layer * h * w, expected * classes[:, :, None, None])
    with torch.no_grad():
        model.classifier.weight.abs_()
    layer, _ = METHODS["layercam"](model, x, classes)
    cam, _ = METHODS["cam"](model, x, classes)
    close(_normalised(layer[classes > 0]), _normalised(cam[classes > 0]))


@pytest.mark.parametrize("cls", [Classifier, SoftplusHead], ids=["gap-linear", "softplus-head"])
def test_eigencam_is_the_same_map_for_every_class(cls):
    model = make(cls)
    x, classes = batch()
    maps, _ = METHODS["eigencam"](model, x, classes)
    for b in range(x.shape[0]):
        wanted = torch.nonzero(classes[b]).flatten()
        for u in wanted[1:]:
            close(maps[b, u], maps[b, wanted[0]])
    assert maps.amax() > 0
    # ... and does not depend on the head at all
    other = make(cls, seed=3)
    other.backbone.load_state_dict(model.backbone.state_dict())
    close(METHODS["eigencam"](other, x, classes)[0], maps)


def test_ablationcam_drops_are_the_closed_form_for_gap_linear_in_any_batching():
    """s_c - s_c(A_k = 0) = W_ck mean(A_k) for GAP + linear; the batched ablation gives the
    same maps however many copies go through the head at once."""
    model = make()
    x, classes = batch()
    feats = model.features(x)
    logits = model(x)
    alpha = model.head_weight()[None] * feats.mean((2, 3))[:, None, :] / logits[:, :, None]
    expected = F.relu(torch.einsum("bchw,bkc->bkhw", feats, alpha)) * classes[:, :, None, None]
    for n in (1, 7, 10_000):
        close(METHODS["ablationcam"](model, x, classes, MethodOptions(ablation_batch=n))[0],
              expected)


def test_single_class_minmax_and_d_minmax_reduce_to_cam():
    model = make()
    x, _ = batch()
    one = torch.zeros(3, K, dtype=torch.float64)
    one[torch.arange(3), torch.tensor([0, 2, 3])] = 1
    cam, _ = METHODS["cam"](model, x, one)
    close(METHODS["minmax"](model, x, one)[0], cam)
    close(METHODS["d-minmax"](model, x, one, MethodOptions(lambda_bg=1.0))[0], cam)
    close(METHODS["minmax-gradcam"](model, x, one)[0], METHODS["gradcam"](model, x, one)[0])


class TwoHalves(nn.Module):
    """Channel 0 fires on the left half of the image, channel 1 on the right half."""
    out_channels = 2

    def forward(self, x):
        h, w = x.shape[2] // 4, x.shape[3] // 4
        f = torch.zeros(x.shape[0], 2, h, w, dtype=x.dtype)
        f[:, 0, :, : w // 2] = 1
        f[:, 1, :, w // 2:] = 1
        return f


def test_minmax_suppresses_a_class_where_another_detected_class_weighs_more():
    model = Classifier(TwoHalves(), 2, mean=(0, 0, 0), std=(1, 1, 1)).double()
    with torch.no_grad():  # class 0 uses both halves a little, class 1 the right half a lot
        model.classifier.weight.copy_(torch.tensor([[1.0, 0.5], [0.0, 2.0]])[:, :, None, None])
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    both = torch.ones(1, 2, dtype=torch.float64)
    cam, _ = METHODS["cam"](model, x, both)
    mm, _ = METHODS["minmax"](model, x, both)
    dmm, _ = METHODS["d-minmax"](model, x, both)
    assert torch.all(cam[0, 0, :, 2:] == 0.5) and torch.all(cam[0, 0, :, :2] == 1)
    assert torch.all(mm[0, 0, :, 2:] == 0) and torch.all(mm[0, 0, :, :2] == 1)
    assert torch.all(dmm[0, 0, :, 2:] == 0)  # relu(0.5 - 2) + 0
    # class 1 alone in D: nothing to subtract, MinMax is CAM
    only1 = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    close(METHODS["minmax"](model, x, only1)[0], METHODS["cam"](model, x, only1)[0])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_batch_that_wants_no_class_gets_zero_maps(name):
    model = make()
    x, _ = batch(b=2)
    none = torch.zeros(2, K, dtype=torch.float64)
    maps, logits = METHODS[name](model, x, none, MethodOptions(smoothgrad_samples=1))
    assert maps.shape[:2] == (2, K) and torch.all(maps == 0)
    close(logits, model(x))


def test_tta_runs_every_method_with_the_same_output_format():
    model = make().float()
    x = (torch.rand(2, 3, 32, 32) * 255)
    for name, fn in METHODS.items():
        maps, probs = tta_maps(model, fn, x, [np.array([0, 3]), np.array([1])],
                               scales=(1.0, 0.5), flip=True,
                               opts=MethodOptions(scorecam_batch=8))
        assert maps[0].shape == (2, 32, 32) and maps[1].shape == (1, 32, 32), name
        assert all(m.max() <= 1 + 1e-6 and m.min() >= 0 for m in maps), name
        assert probs.shape == (2, K)


# ---------------------------------------------------------------- KUR

def test_kernel_usage_equals_the_formula_and_passes_gradients():
    w = torch.randn(K, C, dtype=torch.float64, requires_grad=True)
    out = kernel_usage(w)
    expected = torch.empty_like(w)
    for k in range(C):
        col = w[:, k]
        e = torch.exp(col - col.max())
        expected[:, k] = col * e / e.sum()
    close(out, expected)
    assert torch.autograd.gradcheck(kernel_usage, (w,))
    model = make(kur=True)
    x, classes = batch()
    F.binary_cross_entropy_with_logits(model(x), classes).backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    close(model.head_weight(), kernel_usage(model.classifier.weight.flatten(1)))
