"""Explaining methods that differentiate the whole model: maps at the input's resolution
(or, for fused LayerCAM, at the first backbone stage's), same contract as `methods.py`.

- `gradient` (Simonyan et al., ICLR-W 2014): M_c = max over colour channels of |ds_c/dx|,
  x the image as given (0..255; the normalisation is inside the model).
- `smoothgrad` (Smilkov et al., 2017): the mean of that map over `smoothgrad_samples`
  copies x + N(0, sigma^2), sigma = `smoothgrad_noise` * (max x - min x) per image.
- `fullgrad` (Srinivas and Fleuret, NeurIPS 2019): psi(ds_c/dz (.) z) + sum over layers
  with a bias of sum_channels psi(ds_c/dh_l (.) b_l), z the normalised input the backbone
  sees, h_l a layer's output, b_l its bias (for BatchNorm in eval mode its effective
  bias beta - gamma mu / sqrt(var + eps), as the paper's code); psi = abs, then min-max
  over the channels and positions of one image's term (the paper's code: x - min, then
  / (max + 1e-6)), summed over channels and resized bilinearly to the input; the sum
  of the terms, less its minimum over the image (the final min-max of the paper's code
  and of pytorch-grad-cam, whose / max the seeds do). For a ReLU
  network sum(ds/dz (.) z) + sum_l sum(ds/dh_l (.) b_l) = s_c (completeness).
- `layercam-fused` (Jiang et al., TIP 2021): LayerCAM ReLU(sum_k ReLU(ds_c/dA_k) (.) A_k) on
  every stage of `backbone.forward_stages`, each divided by its maximum, scaled by
  tanh(`layercam_gamma` * M) (the paper's eq. 9; TorchCAM applies it to every stage) and
  resized to the first stage's size; the fused map is their element-wise maximum.

One forward with autograd serves all classes: the wanted (image, class) pairs are packed
into jobs, job j giving each image the gradient of its own j-th wanted class
(`methods.class_objectives`; images are independent in eval mode, so d(sum_b
s_{u_b}(x_b))/dx_b = ds_{u_b}(x_b)/dx_b), and each chunk of `grad_chunk` jobs is one
backward with `is_grads_batched`. Images that want different numbers of classes go in
separate sub-batches (`by_class_count`), so a batch costs one forward per image and one
backward per wanted (image, class) pair, batched over the images. FullGrad keeps the
gradient of every biased layer's output until it is reduced, so it takes one job per
backward (still all images at once). SmoothGrad repeats all this per noisy copy of the
batch; the noise of copy i is one (1, 3, h, w) draw from a generator seeded with `seed`,
scaled per image, so an image gets the same noise in any batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def _options(opts):
    if opts is None:
        from .methods import MethodOptions
        return MethodOptions()
    return opts


def batched_grads(outputs: torch.Tensor, inputs: Sequence[torch.Tensor],
                  coeffs: torch.Tensor, reduce_fn: Callable, chunk: int) -> torch.Tensor:
    """reduce_fn(grads) for chunks of the jobs in coeffs (J, B, K): grads is a tuple with,
    per input, d(sum_b coeffs[j, b] . outputs[b])/d input stacked over the chunk's jobs
    (j, *input.shape). Returns the reduced chunks concatenated (J, ...)."""
    parts = []
    step = max(1, chunk)
    for i in range(0, coeffs.shape[0], step):
        grads = torch.autograd.grad(outputs, list(inputs), grad_outputs=coeffs[i:i + step],
                                    is_grads_batched=True, retain_graph=True)
        parts.append(reduce_fn(grads))
        del grads
    return torch.cat(parts)


def _explain(model, images, classes, opts, forward: Callable, reduce_fn: Callable):
    """Shared frame: `forward(images) -> (logits, inputs)` with autograd on, then the
    batched backward for every class of `classes`; maps (B, K, ...), logits (B, K)."""
    from .methods import class_objectives, scatter_maps

    opts = _options(opts)
    with torch.enable_grad():
        logits, inputs = forward(images)
        index, coeffs = class_objectives(classes.to(logits.dtype))
        if not len(index):  # no class wanted: zero maps at the largest input's size
            size = max((t.shape[2:] for t in inputs), key=lambda s: s[0] * s[1])
            return logits.new_zeros((*classes.shape, *size)), logits.detach()
        per_job = batched_grads(logits, inputs, coeffs, reduce_fn, opts.grad_chunk)
    return scatter_maps(per_job.detach(), index, classes), logits.detach()


def by_class_count(method: Callable) -> Callable:
    """Run `method` on the sub-batches of images that want the same number of classes.
    Job j of a backward differentiates every image of the batch, also those with fewer
    than j + 1 classes (their rows are zero but cost the same), so a mixed batch would
    pay (images x the most classes of one image) backwards through the whole model; by
    groups it pays one backward per wanted (image, class) pair, as a per-image loop does,
    with the batch's efficiency."""
    def grouped(model, images, classes, opts=None):
        counts = (classes > 0).sum(1)
        sizes = counts.unique()
        if len(sizes) <= 1:
            return method(model, images, classes, opts)
        maps = logits = None
        for n in sorted(sizes.tolist(), reverse=True):   # images that want none: last
            idx = torch.nonzero(counts == n).flatten()
            if n == 0:
                with torch.no_grad():
                    logits[idx] = model(images[idx]).to(logits.dtype)
                continue
            m, lg = method(model, images[idx], classes[idx], opts)
            if maps is None:
                maps = m.new_zeros((len(images), *m.shape[1:]))
                logits = lg.new_zeros((len(images), *lg.shape[1:]))
            maps[idx], logits[idx] = m, lg
        return maps, logits
    grouped.__name__ = grouped.__qualname__ = method.__name__
    grouped.__doc__ = method.__doc__
    return grouped


def _saliency(grads) -> torch.Tensor:
    """|ds/dx| max over colour channels: (j, B, 3, H, W) -> (j, B, H, W)."""
    return grads[0].abs().amax(dim=2)


@by_class_count
def gradient(model, images, classes, opts=None):
    def forward(x):
        x = x.detach().requires_grad_(True)
        return model(x), [x]
    return _explain(model, images, classes, opts, forward, _saliency)


def smoothgrad(model, images, classes, opts=None):
    opts = _options(opts)
    n = max(1, opts.smoothgrad_samples)
    sigma = opts.smoothgrad_noise * (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3)))
    gen = torch.Generator(device=images.device).manual_seed(opts.seed)
    total = None
    for _ in range(n):
        noise = torch.randn((1, *images.shape[1:]), generator=gen, device=images.device,
                            dtype=images.dtype)
        noisy = images + noise * sigma[:, None, None, None]
        maps, _ = gradient(model, noisy, classes, opts)
        total = maps if total is None else total + maps
    with torch.no_grad():
        logits = model(images)
    return total / n, logits


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias FullGrad attributes to a layer: a convolution's bias, BatchNorm's
    beta - gamma mu / sqrt(var + eps) in eval mode; None for other layers."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or not module.track_running_stats:
            return None  # batch statistics: no per-image bias
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -module.running_mean * scale
        return (bias + module.bias if module.bias is not None else bias).detach()
    if isinstance(module, nn.modules.conv._ConvNd) and module.bias is not None:
        return module.bias.detach()
    return None


def fullgrad_terms(model, images: torch.Tensor, coeffs: torch.Tensor, reduce_fn: Callable,
                   chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """FullGrad's decomposition of the objectives coeffs (J, B, K) . s, per chunk of jobs:
    `reduce_fn(input_term, bias_terms)` with input_term = ds/dz (.) z (j, B, 3, H, W) and
    bias_terms a list of ds/dh_l (.) b_l (j, B, C_l, h_l, w_l), one per layer with a bias
    and 4-D output. Returns the reduced chunks (J, ...) and the logits (B, K).

    A zero probe added to each such layer's output carries its gradient: in-place
    operations that follow (ReLU(inplace=True)) leave the probe untouched."""
    z = ((images - model.mean) / model.std).detach().requires_grad_(True)
    probes: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []

    def hook(module, args, out):
        bias = effective_bias(module)
        if bias is None or not torch.is_tensor(out) or out.dim() != 4 \
                or out.shape[1] != bias.numel():
            return None
        probe = torch.zeros_like(out, requires_grad=True)
        probes.append(probe)
        biases.append(bias.to(out.dtype)[None, None, :, None, None])
        return out + probe

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if effective_bias(m) is not None]
    try:
        with torch.enable_grad():
            logits = model.logits_from_features(model.backbone(z))
    finally:
        for h in handles:
            h.remove()

    def reduce(grads):
        return reduce_fn(grads[0] * z.detach()[None],
                         [g * b for g, b in zip(grads[1:], biases)])

    with torch.enable_grad():
        out = batched_grads(logits, [z, *probes], coeffs, reduce, chunk)
    return out, logits.detach()


def _psi(term: torch.Tensor, size) -> torch.Tensor:
    """FullGrad's post-processing of one term (j, B, C, h, w) -> (j, B, H, W)."""
    a = term.abs().flatten(2)
    a = a - a.amin(dim=2, keepdim=True)
    a = a / (a.amax(dim=2, keepdim=True) + 1e-6)
    m = a.view(term.shape).sum(dim=2)
    if m.shape[-2:] != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m


@by_class_count
def fullgrad(model, images, classes, opts=None):
    from .methods import class_objectives, scatter_maps

    opts = _options(opts)
    size = images.shape[2:]
    index, coeffs = class_objectives(classes.to(images.dtype))

    def reduce(input_term, bias_terms):
        total = _psi(input_term, size)
        for t in bias_terms:
            total = total + _psi(t, size)
        # the sum of ~20 terms in [0, C_l] sits on a floor that covers the whole image;
        # the paper's code and pytorch-grad-cam min-max the final map before use, and
        # without it a map / max threshold keeps every pixel (box accuracy 0 on the demo)
        return total - total.amin(dim=(-2, -1), keepdim=True)

    if not len(index):
        with torch.no_grad():
            return images.new_zeros((*classes.shape, *size)), model(images)
    # one class per backward: the gradients of every biased layer's output are all held
    # until reduced, so a chunk of J classes would hold J copies of the activations
    per_job, logits = fullgrad_terms(model, images, coeffs, reduce, chunk=1)
    return scatter_maps(per_job.detach(), index, classes), logits


@by_class_count
def layercam_fused(model, images, classes, opts=None):
    opts = _options(opts)
    if not hasattr(model.backbone, "forward_stages"):
        raise ConfigError("cams.method layercam-fused needs a backbone with forward_stages "
                          f"({type(model.backbone).__name__} has none)")
    stages: list[torch.Tensor] = []

    def forward(x):
        z = ((x - model.mean) / model.std).detach().requires_grad_(True)
        stages[:] = model.backbone.forward_stages(z)
        return model.logits_from_features(stages[-1]), stages

    def reduce(grads):
        size = max((a.shape[2:] for a in stages), key=lambda s: s[0] * s[1])
        fused = None
        for g, a in zip(grads, stages):
            m = F.relu((F.relu(g) * a.detach()[None]).sum(dim=2))         # (j, B, h, w)
            peak = m.flatten(2).amax(dim=2)[:, :, None, None]
            m = torch.tanh(opts.layercam_gamma * m / torch.where(peak > 0, peak,
                                                                  torch.ones_like(peak)))
            if m.shape[2:] != size:
                m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
            fused = m if fused is None else torch.maximum(fused, m)
        return fused

    return _explain(model, images, classes, opts, forward, reduce)
