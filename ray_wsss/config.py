"""Typed configuration: one frozen dataclass per stage, loaded from YAML.

`load_config(path, overrides=["cams.scales=[1.0,0.5]", ...])` reads a YAML file, applies
`key.sub=value` overrides (values parsed as YAML), and checks every key and type, so a
misspelled key fails with its dotted name instead of being ignored.

The stage graph (`graph.py`) says which fields of a section are resources (how much
hardware a stage gets, not what it computes): they are left out of the stage hashes, so
a run resumed on a bigger cluster does not recompute finished stages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .errors import ConfigError

# Metadata of config fields added after run directories already existed: such a field is
# left out of its stage's hash while it holds its default, so adding it does not make
# finished stages of older runs stale. Use `added(default)` for every new field of an
# existing section (a new section is not in any older stage's hash anyway).
ADDED = "hash_only_when_set"


def added(default: Any = None, factory: Any = None) -> Any:
    """A config field added later (see ADDED): `x: float = added(0.5)`."""
    if factory is not None:
        return field(default_factory=factory, metadata={ADDED: True})
    return field(default=default, metadata={ADDED: True})


@dataclass(frozen=True)
class DemoConfig:
    """The bundled synthetic dataset (`ray_wsss.data.demo`)."""
    num_train: int = 800
    num_val: int = 160
    image_size: int = 160
    seed: int = 0


@dataclass(frozen=True)
class SubsetConfig:
    """One folder of images (and optionally masks) imported as one split."""
    split: str = "train"
    images: str = ""
    masks: str | None = None
    ids: str | None = None  # optional text file of ids to take (VOC ImageSets style)
    annotations: str | None = None  # COCO instances JSON of this split


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset comes from.

    source: `demo` (generated), `parquet` (an already imported dataset at `path`),
    `voc`, `folder` or `coco` (imported from `path` by the dataset stage).
    """
    source: Literal["demo", "parquet", "voc", "folder", "coco"] = "demo"
    path: str | None = None
    demo: DemoConfig = field(default_factory=DemoConfig)
    # importer options (voc / folder / coco)
    subsets: tuple[SubsetConfig, ...] = ()
    labels_csv: str | None = None
    classes: tuple[str, ...] = ()
    mask_offset: int = 0          # added to mask values (CamVid's 0-based classes: 1)
    ignore_values: tuple[int, ...] = ()  # mask values mapped to 255 (before the offset)
    background: bool = True       # False: every pixel belongs to a class (e.g. CamVid)
    max_image_side: int | None = None  # larger images (and masks) are resized at import
    skip_bad: bool = False
    # tiles of large images, each a row tagged with the classes on at least
    # `tile_min_fraction` of its labelled pixels (or from `tile_tags`, a CSV of tile ids
    # and labels); `tiles` [rows, cols] or `tile_size` [height, width]; `tile_splits`:
    # the splits to tile (null: all)
    tiles: tuple[int, int] | None = added(None)
    tile_size: tuple[int, int] | None = added(None)
    tile_min_fraction: float = added(0.01)
    tile_tags: str | None = added(None)
    tile_splits: tuple[str, ...] | None = added(None)
    # rotate images by their EXIF orientation tag (masks drawn on the displayed picture);
    # default: stored pixels, as VOC and COCO annotations assume
    apply_exif: bool = added(False)
    max_megapixels: float = added(200.0)  # larger claimed sizes are refused at import


@dataclass(frozen=True)
class ModelConfig:
    """Backbone + classifier head. `pretrained`: a torchvision-format ResNet weight
    file, or `registry` for EfficientNet-Lite0's packaged ImageNet weights."""
    backbone: str = "resnet_mini"
    output_stride: int = 16
    pretrained: str | None = None


@dataclass(frozen=True)
class HeadConfig:
    """The classifier head. `kur`: Kernel Usage Regularization (David, Pedrini and Dias
    2022), a reparametrisation W * softmax over classes of W, used in training and in
    every CAM method."""
    kur: bool = False


@dataclass(frozen=True)
class PuzzleConfig:
    """Puzzle-CAM (Jo and Yu 2021): 2x2 tiles of the image, their class maps re-assembled;
    classification of both plus alpha * L1(full maps, re-assembled maps) on the image's
    classes. alpha 0: off. alpha ramps linearly from 0 over `alpha_schedule` of training."""
    alpha: float = 0.0
    alpha_schedule: float = 0.5


@dataclass(frozen=True)
class OcCseConfig:
    """OC-CSE (Kweon et al. 2021): a random class of each image is erased with the model's
    own CAM; a fixed ordinary classifier (`oc_model`: the classifier folder of an earlier
    run) must then not find it: weight * BCE(OC(erased), labels without it). The weight
    ramps from `weight_init` to `weight` over training. weight 0: off."""
    weight: float = 0.0
    weight_init: float = 0.3
    oc_model: str | None = None


@dataclass(frozen=True)
class PnocConfig:
    """P-NOC (David et al. 2024): Puzzle + OC-CSE with the OC trained adversarially in
    alternating steps: it learns to find the erased class in what the CAM left, weight
    ramping 0 -> `oc_weight`; its input keeps pixels whose normalised CAM <= threshold."""
    enabled: bool = False
    oc_weight: float = 0.5
    mask_threshold: float = 0.2
    oc_lr_scale: float = 1.0


@dataclass(frozen=True)
class McisConfig:
    """MCIS (Sun et al. 2020) in training: image pairs that share a class, co-attention
    classification on the shared classes, contrastive co-attention on the others."""
    enabled: bool = False
    co_weight: float = 1.0
    contrast_weight: float = 1.0
    contrast_from_epoch: int = 2  # 1-based; the complementary loss joins from this epoch
    # partners are drawn from the current batch, the last `pair_pool` images of the
    # training worker and the last `pair_per_class` images of each class (train/pairs.py)
    pair_pool: int = 64
    pair_per_class: int = 2


@dataclass(frozen=True)
class RegularizersConfig:
    puzzle: PuzzleConfig = field(default_factory=PuzzleConfig)
    oc_cse: OcCseConfig = field(default_factory=OcCseConfig)
    pnoc: PnocConfig = field(default_factory=PnocConfig)
    mcis: McisConfig = field(default_factory=McisConfig)


@dataclass(frozen=True)
class ClassifierConfig:
    """Multi-label classifier fitting on Ray Train."""
    epochs: int = 12
    batch_size: int = 32           # global batch, split over the workers
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    head_lr_multiplier: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    crop_size: int = 128
    scale_range: tuple[float, float] = (0.7, 1.3)
    hflip: bool = True
    color_jitter: float = 0.3
    train_split: str = "train"
    val_split: str | None = "val"
    seed: int = 0
    # Keep the encoded training images in Ray's object store (spilled to disk when
    # large) instead of re-reading the Parquet files every epoch.
    cache_images: bool = True
    # resources (not part of the stage hash)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    torch_threads: int | None = None  # CPU threads per worker; null: cpus_per_worker
    max_failures: int = 2


@dataclass(frozen=True)
class CamConfig:
    """Class activation maps on Ray Data."""
    method: str = "cam"
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    splits: tuple[str, ...] = ("train", "val")
    # MinMax-CAM family weights (David et al. 2022); 1 in the paper
    lambda_pos: float = 1.0
    lambda_neg: float = 1.0
    lambda_bg: float = 1.0
    scorecam_batch: int = 64   # masked images per forward pass of Score-CAM
    # SmoothGrad: noisy copies per image, noise std / (max - min) of the image
    smoothgrad_samples: int = added(16)
    smoothgrad_noise: float = added(0.15)
    ablation_batch: int = added(256)     # Ablation-CAM: feature copies per head forward
    layercam_gamma: float = added(2.0)   # fused LayerCAM: tanh(gamma M / max M) per stage
    grad_chunk: int = added(8)           # classes per batched backward (bounds memory)
    # larger images are shrunk for the network (maps are resized back to the image)
    max_image_side: int | None = 1024
    # the classifier evaluated densely at this output stride: 8 gives a stride-16
    # classifier's maps at twice the resolution with the same weights (its last strided
    # convolution turned into a dilation, DeepLab's conversion of a classifier: the same
    # function on a grid twice as fine, not a bigger image); null: the stride it was
    # trained at (model.output_stride)
    output_stride: int | None = added(None)
    # MCIS co-segmentation (needs a classifier trained with regularizers.mcis): for each
    # class of an image, the co-attention maps with N peers holding it are averaged with
    # the image's own map. Peers come from a bank of `mcis_bank` train images per class.
    mcis_peers: int = 0
    mcis_bank: int = 8
    seed: int = 0
    batch_size: int = 16
    # resources
    num_actors: int | None = None  # null: one per GPU, or CPUs - 1 (reads need a CPU)
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    torch_threads: int | None = None  # null: cpus_per_actor


@dataclass(frozen=True)
class SeedConfig:
    """Seeds from CAMs: argmax over [background score, class maps]."""
    background_threshold: float = 0.30
    # score of background = (1 - max_c M_c) ** background_power when > 0, else the constant
    background_power: float = 0.0


@dataclass(frozen=True)
class CrfConfig:
    """Dense CRF (Kraehenbuehl and Koltun 2011) over background + the image's classes."""
    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 10.0
    bilateral_compat: float = 10.0
    score_temperature: float = 0.1   # unary = softmax([bg, cams] / temperature)
    batch_size: int = 8
    # resources
    cpus_per_task: float = 1.0


@dataclass(frozen=True)
class EvaluateConfig:
    splits: tuple[str, ...] = ("val",)
    thresholds: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
    batch_size: int = 16


@dataclass(frozen=True)
class SegmenterConfig:
    """DeepLabV3+ (Chen et al. 2018) fitted on the pseudo masks with Ray Train.

    `masks`: which pseudo masks it learns from: `crf` (the dense-CRF masks), `seeds`
    (the CAM seeds at seeds.background_threshold), `random_walk` (IRN's random-walk
    masks; needs random_walk.enabled). `unsure_band` [low, high]: pixels
    whose highest CAM of the image's classes lies in [low, high) are set to 255 (not
    learned from) in the chosen masks; null keeps every pixel.
    The optimizer is SGD with Nesterov-free momentum applied as momentum (not the
    weight-decay-in-the-momentum-slot of IRN's PolyOptimizer; see README)."""
    backbone: str | None = None      # null: model.backbone
    pretrained: str | None = None    # null: model.pretrained
    output_stride: int = 16          # 16 or 8 (ASPP rates doubled at 8)
    # where the backbone's weights start: `pretrained` (model.pretrained / this section's),
    # `classifier` (the fitted classifier's backbone), `scratch`; `auto`: pretrained
    # where weights are configured, else classifier
    init: Literal["auto", "pretrained", "classifier", "scratch"] = "auto"
    # DeepLabV3+ widths: ASPP branches and decoder convs (256 in the paper)
    aspp_channels: int = 256
    decoder_channels: int = 256
    masks: Literal["crf", "seeds", "random_walk"] = "crf"
    unsure_band: tuple[float, float] | None = None
    # semi-weak mode (sections `semi`, `pct`): `weak` learns the pseudo masks with
    # cross entropy (and the ground truth of the pixel-labelled images `semi` names, if
    # any); `cce` the same with class-aware cross entropy (softmax over the image's
    # classes and background); `pct` learns the hybrid net's label-restricted
    # predictions (stage `pct`) with CCE, the pixel-labelled images their ground truth
    mode: Literal["weak", "cce", "pct"] = added("weak")
    # per-class weights of the loss: null (every pixel alike) or `median_frequency`
    # (SegNet's median frequency balancing, Eigen & Fergus 2015: class c weighs
    # median_f / f_c, f_c = its pixels / the pixels of the train images that hold it,
    # counted on the fit's targets): thin and rare classes (poles, signs) are not drowned
    # by road and sky. Background counts as a class.
    class_weights: Literal["median_frequency"] | None = added(None)
    epochs: int = 10
    batch_size: int = 16             # global batch, split over the workers
    lr: float = 0.01
    head_lr_multiplier: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    crop_size: int = 128
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    color_jitter: float = 0.3
    train_split: str = "train"
    val_split: str | None = "val"
    seed: int = 0
    cache_images: bool = True
    # resources (not part of the stage hash)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    torch_threads: int | None = None
    max_failures: int = 2


@dataclass(frozen=True)
class SemiConfig:
    """Semi-weak mode: which train images are pixel-labelled (their ground-truth masks are
    learned); every other train image contributes its tags only, even where the dataset
    holds its mask. `labelled_file`: a text file of image ids, one per line (`#` starts
    a comment); or `labelled_count` ids drawn with `seed` from the sorted ids of the
    segmenter's train split that have a mask, `draw: stratified` (default: every class
    covered first, rarest first, then uniform) or `uniform`. Neither: no image is
    pixel-labelled.
    Images of any other split are refused. Part of the hash of the steps that read it
    (the file by its content)."""
    labelled_file: str | None = None
    labelled_count: int = 0
    seed: int = 0
    draw: str = "stratified"


@dataclass(frozen=True)
class PctConfig:
    """Progressive cross training (Pattern Recognition 2022; stage `pct`, used when
    `segmenter.mode: pct`): a hybrid net H and a pseudo net P, DeepLabV3+ of the
    segmenter's architecture with weights not shared, fitted together on Ray Train, each
    batch half pixel-labelled, half tagged. H: CCE on ground truth + `tag_weight` x
    multi-label BCE on the global max pooling of its class maps + `cross_weight` x CCE
    towards P's label-restricted argmax on the tagged half, weighted per image by
    (min over its classes of J_c) ** `weight_power`; P: CCE towards H's label-restricted
    argmax on the tagged half. J_c: P's running IoU on the pixel-labelled half, from
    counters decayed by `iou_momentum` and summed over the workers. H's label-restricted
    predictions of the train split (TTA `scales`, `flip`) are the segmenter's targets."""
    epochs: int = 10
    batch_size: int = 16             # global, half pixel-labelled and half tagged
    lr: float = 0.01
    head_lr_multiplier: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    crop_size: int = 128
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    color_jitter: float = 0.3
    tag_weight: float = 1.0
    cross_weight: float = 1.0
    weight_power: float = 8.0
    iou_momentum: float = 0.99
    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    max_image_side: int | None = 1024  # larger images are shrunk for H's predictions
    seed: int = 0
    # resources (not part of the stage hash): the fit's workers, the prediction actors
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    torch_threads: int | None = None
    max_failures: int = 2
    predict_batch_size: int = 8
    num_actors: int | None = None
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0


@dataclass(frozen=True)
class PredictConfig:
    """The segmentation model applied to images (Ray Data actors): multi-scale + flip
    TTA over softmax scores, optionally refined by the dense CRF of the `crf` section."""
    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    crf: bool = False
    splits: tuple[str, ...] = ("train", "val")
    evaluate_splits: tuple[str, ...] = ("val",)
    max_image_side: int | None = 1024
    batch_size: int = 8
    # tiled datasets: label each frame whole (its tiles stitched back) and cut the label
    # map into the tiles; false labels every tile alone
    whole_frames: bool = added(False)
    # resources
    num_actors: int | None = None
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    torch_threads: int | None = None


@dataclass(frozen=True)
class LoopConfig:
    """The iterative loop of T rounds (the founding diagram). After round t the
    segmentation model's softmax class masks c_i (over the image's classes and
    background) and the classifier's probabilities P(c_i) make the prior
    M_{t+1} = sum_i alpha_i c_i P(c_i) / max_i alpha_i (in [0, 1]), an extra input
    channel of round t+1's classifier (in training, CAMs and explain); M_1 is uniform
    (round 1 is the plain pipeline).

    `prior`: `sum` (one channel, the diagram) or `per_class` (K channels alpha_i c_i P(c_i)
    / max alpha). `feedback`: `prior` (the diagram) or `labels` (self-training, the common
    multi-round baseline: round t+1's segmentation model is fitted on round t's
    CRF-refined predictions of the train split; needs predict.crf: true).
    `alpha`: one weight per class (null: 1 for every class). `warm_start`: round t+1's
    classifier starts from round t's weights (the extra channels from zero), else from
    the initialisation of round 1. `rounds` is in no hash: raising T reuses rounds 1..T-1.
    `fallback` (self-training only): what a train image's target takes from round 1's
    pseudo masks (the ones `segmenter.masks` names) where the previous round's model lost
    its tags: `class`: the round-1 pixels of every tagged class the prediction holds no
    pixel of (a thin class the model dropped is not lost for good); `image`: the whole
    round-1 mask of an image whose prediction holds none of its tags; `none`: nothing.
    """
    rounds: int = 1
    prior: Literal["sum", "per_class"] = "sum"
    feedback: Literal["prior", "labels"] = "prior"
    alpha: tuple[float, ...] | None = None
    warm_start: bool = False
    fallback: Literal["none", "class", "image"] = added("none")
    # resources of the prior stage's actors
    batch_size: int = 8
    num_actors: int | None = None
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    torch_threads: int | None = None


@dataclass(frozen=True)
class LabelCrfConfig:
    """Dense CRF from hard labels (IRN's `crf_inference_label`): each pixel's unary puts
    `gt_prob` on its label; IRN's kernels (Gaussian 3/3, bilateral 50/5/10)."""
    gt_prob: float = 0.7
    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0


@dataclass(frozen=True)
class AffinityConfig:
    """IRN's affinity labels and boundary network (Ahn, Cho and Kwak 2019), used when
    `random_walk.enabled`.

    Labels (stage `affinity_labels`, train split of the classifier): confident
    foreground where a class map beats `fg_threshold`, confident background where none
    beats `bg_threshold`, each map cleaned by `label_crf`; 255 (unsure) elsewhere.
    Network (stage `affinity`, Ray Train): 1x1 heads on the stages of a frozen backbone
    -> boundary map at stride 4, affinities 1 - path max, trained on the pairs within
    `radius` with the 1/4 bg+ + 1/4 fg+ + 1/2 neg loss. `init`: the frozen backbone's
    weights: `classifier` (the fitted classifier's own backbone), `pretrained`
    (model.pretrained's ImageNet weights, as IRN). IRN: 3 epochs, crop 512, batch 32,
    lr 0.1, weight decay 1e-4, poly; its PolyOptimizer leaves SGD momentum at ~0, which
    `momentum: 0.0` reproduces (see README)."""
    fg_threshold: float = 0.30
    bg_threshold: float = 0.05
    label_crf: LabelCrfConfig = field(default_factory=LabelCrfConfig)
    # `saliency` (C²AM-H, P-NOC): the C²AM saliency map S (stage `saliency`) replaces the
    # low CAM threshold: background = CRF(S < saliency_threshold), foreground =
    # CRF(salient ⊙ argmax([saliency_fg_threshold, M])); `cams`: the two thresholds above
    labels_from: Literal["cams", "saliency"] = added("cams")
    saliency_threshold: float = added(0.10)
    saliency_fg_threshold: float = added(0.40)
    init: Literal["classifier", "pretrained"] = "classifier"
    radius: int = 10
    epochs: int = 3
    batch_size: int = 32             # global batch, split over the workers
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    crop_size: int = 512
    scale_range: tuple[float, float] = (0.7, 1.3)
    hflip: bool = True
    seed: int = 0
    label_batch_size: int = 8        # images per affinity-label task
    # resources (not part of the stage hash)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    torch_threads: int | None = None
    max_failures: int = 2
    label_cpus_per_task: float = 1.0


@dataclass(frozen=True)
class C2amConfig:
    """C²AM (Xie et al., "C2AM: Contrastive learning of Class-agnostic Activation Map",
    CVPR 2022) with CAM hints (C²AM-H, David et al. 2024, P-NOC), fitted with Ray Train
    when `affinity.labels_from: saliency`.

    A one-channel head on the backbone gives A = sigmoid(.); per image v_fg = mean(A f),
    v_bg = mean((1 - A) f). Across the batch (and `memory_size` past embeddings of the
    worker, so small CPU batches still see many pairs) fg-fg and bg-bg pairs are pulled
    together (-log cos, rank-weighted exp(-rank_alpha * rank)) and fg-bg pairs pushed
    apart (-log(1 - cos)). Hints: BCE towards 1 (smoothed by `label_smoothing`) where the
    classifier's max CAM is >= `hint_fg_threshold`, weight `hint_weight` (0: plain C²AM,
    polarity then chosen by CCAM's border rule); `hint_bg_threshold` also pulls A towards
    0 where the max CAM is below it (null: off, as P-NOC's final recipe). `init`: the
    backbone's start (as segmenter.init). CCAM: batch 32, lr 0.001 (head x10), 10 epochs,
    crop 448."""
    init: Literal["auto", "pretrained", "classifier", "scratch"] = "auto"
    hint_weight: float = 1.0
    hint_fg_threshold: float = 0.4
    hint_bg_threshold: float | None = None
    label_smoothing: float = 0.1
    rank_alpha: float = 0.25
    memory_size: int = 0             # past fg/bg embeddings per worker in the losses
    epochs: int = 10
    batch_size: int = 32             # global batch, split over the workers
    lr: float = 0.001
    head_lr_multiplier: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    crop_size: int = 448
    scale_range: tuple[float, float] = (0.7, 1.3)
    hflip: bool = True
    seed: int = 0
    # resources (not part of the stage hash)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    torch_threads: int | None = None
    max_failures: int = 2


@dataclass(frozen=True)
class SaliencyConfig:
    """The C²AM saliency of every image of `splits` (Ray Data actors): the map A (mean
    of the image's and its mirror's logits when `flip`), the mask argmax([threshold, A])
    cleaned by a dense CRF from labels (`crf`, IRN's label CRF). Scored against ground
    truth foreground / background."""
    threshold: float = 0.2
    flip: bool = True
    crf: LabelCrfConfig = field(default_factory=LabelCrfConfig)
    splits: tuple[str, ...] = ("train", "val")
    max_image_side: int | None = 1024
    batch_size: int = 8
    # resources
    num_actors: int | None = None
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    torch_threads: int | None = None


@dataclass(frozen=True)
class WalkCrfConfig:
    """The optional dense CRF on the walked maps (Puzzle-CAM / P-NOC's
    `make_pseudo_labels`): unary -log of [background_threshold, walked maps / max],
    their kernels (Gaussian 3/3, bilateral 80/13/10). iterations 0: off (IRN)."""
    iterations: int = 0
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0


@dataclass(frozen=True)
class RandomWalkConfig:
    """Random-walk pseudo masks (IRN), computed sparsely on Ray Data actors.

    `enabled`: run the stages affinity_labels, affinity and random_walk (off: they are
    skipped and no other step depends on them). Per image: the boundary map of the
    affinity network (averaged with that of the mirrored image when `flip`, as IRN),
    affinities on the pairs within `radius`, A ** `beta`, `steps` steps of the walk of
    the CAMs of the image's classes (times 1 - boundary). Mask: the walked maps divided
    by their global max, background where no class beats `background_threshold` (IRN
    0.25; Puzzle-CAM / P-NOC threshold at 0.30-0.35 and add a one-iteration `crf`);
    `walked_background`: a background map (1 - max CAM) ** `background_power`
    (AffinityNet) is walked with the classes and competes in the argmax instead."""
    enabled: bool = False
    radius: int = 5
    beta: float = 10.0
    steps: int = 256
    background_threshold: float = 0.25
    walked_background: bool = False
    background_power: float = 16.0
    flip: bool = True
    crf: WalkCrfConfig = field(default_factory=WalkCrfConfig)
    max_image_side: int | None = 1024  # larger images are shrunk for the network and walk
    batch_size: int = 8
    # resources
    num_actors: int | None = None  # null: one per GPU, or CPUs - 1
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    torch_threads: int | None = None  # null: cpus_per_actor


@dataclass(frozen=True)
class ExplainConfig:
    """`ray-wsss explain`: XAI metrics and seed mIoU per explaining method (uses the
    cams section's scales, flip, lambdas and resources)."""
    methods: tuple[str, ...] = ("cam", "gradcam", "gradcampp", "scorecam", "minmax",
                                "d-minmax", "minmax-gradcam")
    splits: tuple[str, ...] = ("val",)
    max_images: int | None = None   # evenly spaced subset (Score-CAM is costly)
    scales: tuple[float, ...] | None = None  # TTA of the comparison; null: cams.scales
    flip: bool | None = None                 # null: cams.flip
    sample_images: int = 4          # images shown side by side in the report
    batch_size: int = 8
    # faithfulness beside the XAI metrics: ROAD (% of pixels removed most- / least-
    # relevant first, imputed from their neighbours; [] turns it off), deletion /
    # insertion curves (points, insertion's blur), images per forward; box accuracy
    # (CorLoc) at a threshold of the normalised map
    road_percentiles: tuple[float, ...] = (10.0, 30.0, 50.0, 70.0, 90.0)
    road_noise: float = 0.01
    curve_steps: int = 10
    insertion_blur: float = 5.0
    forward_batch: int = 32
    box_threshold: float = 0.2


@dataclass(frozen=True)
class ReportConfig:
    num_images: int = 10
    split: str = "val"


@dataclass(frozen=True)
class RayConfig:
    """How to reach Ray: `address` null starts a local instance (or joins the cluster of
    a `ray job submit`, which sets RAY_ADDRESS)."""
    address: str | None = None
    num_cpus: int | None = None
    include_dashboard: bool = True
    progress_bars: bool = True
    # Stages write Parquet files of at least this size; 0: a file per block of the stage
    # (Ray Data's default). On object stores (s3://) a few files of e.g. 64 MB are
    # cheaper to list and to read back than thousands of small ones.
    output_file_mb: int = 0
    # Ray Data reads Parquet footers with a pool of actors that every read starts and
    # kills (32 by default, one Python process each, ~100 MB). On a local instance the
    # pool has this many, null: 1 (local footers need no parallel IO, and each actor
    # costs its start on every read: a read of 20 small files took 2.8 s with 32, 2.0
    # with 4 and 0.9 with 1 on 2 cores). Clusters keep Ray's default.
    local_footer_readers: int | None = None
    # A stage asked to use GPUs (classifier.use_gpu, cams.gpus_per_actor, ...) where torch
    # sees no CUDA device fails at once; true lets it run on the CPU with a warning.
    allow_cpu_fallback: bool = False


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    regularizers: RegularizersConfig = field(default_factory=RegularizersConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    cams: CamConfig = field(default_factory=CamConfig)
    seeds: SeedConfig = field(default_factory=SeedConfig)
    crf: CrfConfig = field(default_factory=CrfConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    pct: PctConfig = field(default_factory=PctConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    c2am: C2amConfig = field(default_factory=C2amConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    random_walk: RandomWalkConfig = field(default_factory=RandomWalkConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    ray: RayConfig = field(default_factory=RayConfig)




# ---------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-4 (an exponent without a dot: a string to YAML
    1.1) as the float YAML 1.2 and every user mean."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def read_yaml(text) -> Any:
    """YAML text or a stream, as config files, overrides and sweep files are read."""
    return yaml.load(text, Loader=_Loader)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys by dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    return config


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested mapping."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse {raw!r}: {exc}") from None
    set_key(data, key, value)


def set_key(data: dict, key: str, value: Any) -> None:
    """Set dotted `key` of a nested mapping to `value` (a parsed value, not YAML text)."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | None = None, overrides: typing.Iterable[str] = (),
                base: dict | None = None) -> PipelineConfig:
    data: dict = dict(base or {})
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = read_yaml(fh)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = _merge(data, loaded)
    for override in overrides:
        apply_override(data, override)
    try:
        config = from_dict(PipelineConfig, data)
        from .validate import validate  # here: validate.py imports this module
        validate(config)
        return config
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def section_hash(config: PipelineConfig, sections: typing.Iterable[str],
                 upstream: typing.Iterable[str] = (),
                 resources: typing.Mapping[str, typing.Iterable[str]] | None = None) -> str:
    """Hash of the named config sections (the `resources` fields of each excluded;
    default: what the stage graph declares as resources) and upstream hashes."""
    if resources is None:
        from .graph import resource_fields  # here: graph.py imports the stages
        resources = resource_fields()
    payload = {}
    for name in sections:
        payload[name] = _hashed_values(getattr(config, name), (resources or {}).get(name, ()))
    payload["upstream"] = list(upstream)
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _hashed_values(section: Any, skip: typing.Iterable[str] = ()) -> Any:
    """A section as hashed: resource fields left out, and fields added later (ADDED)
    left out while they hold their default, recursively."""
    if not dataclasses.is_dataclass(section):
        return to_dict(section)
    out = {}
    for f in dataclasses.fields(section):
        if f.name in skip:
            continue
        value = getattr(section, f.name)
        if f.metadata.get(ADDED):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value == default:
                continue
        out[f.name] = _hashed_values(value)
    return out


def replace(config: Any, **changes: Any) -> Any:
    """`dataclasses.replace` that also accepts dotted keys: replace(cfg, **{"cams.flip": False})."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **flat)
