"""Stage `report`: one self-contained HTML page (`report/index.html`) of a run.

Summary cards, the mIoU-vs-threshold curve of the CAM seeds, the classifier's training
curve, the per-class IoU table (seeds vs CRF), and a gallery of sample images: image,
the CAM of each of its classes as a heat map, seed, CRF pseudo mask and ground truth.
Pictures are embedded as PNG data URIs, so the file can be mailed or opened offline.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from typing import Sequence

import cv2
import numpy as np

from . import storage
from .data.codecs import PALETTE, decode_array, decode_image, decode_mask
from .data.dataset import DatasetInfo, evenly_spaced, read_table, vector_to_labels

THUMB = 220  # longest side of gallery pictures, pixels


# ---------------------------------------------------------------- pictures

def _png_uri(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _thumb(img: np.ndarray, nearest: bool = False) -> np.ndarray:
    h, w = img.shape[:2]
    s = THUMB / max(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))),
                      interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def heatmap_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """image (H, W, 3) uint8, cam (H, W) in [0, 1] -> RGB picture of the map over the image."""
    heat = cv2.applyColorMap(np.clip(cam * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32)
    weight = alpha * (0.35 + 0.65 * cam[..., None])
    return (image * (1 - weight) + heat * weight).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Label map in VOC colours over a dimmed image; background stays the image, ignore
    (255) is drawn white."""
    colors = PALETTE[mask].astype(np.float32)
    a = np.where(mask[..., None] == 0, 0.0, alpha)
    base = image.astype(np.float32) * 0.85
    out = base * (1 - a) + colors * a
    edges = cv2.morphologyEx((mask.astype(np.int16)), cv2.MORPH_GRADIENT, np.ones((3, 3))) > 0
    out[edges] = colors[edges] * 0.6 + 255 * 0.4
    return out.clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------- charts (inline SVG)

def nice_ticks(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float]]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering
    [lo, hi]: returns the widened range and the ticks, about `target` of them."""
    if not np.isfinite(lo) or not np.isfinite(hi):
        return lo, hi, [lo, hi]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(target - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    best = None
    for step in (m * p for p in (power / 10, power, power * 10) for m in (1, 2, 2.5, 5)):
        start = math.floor(lo / step + 1e-9) * step
        stop = math.ceil(hi / step - 1e-9) * step
        n = int(round((stop - start) / step)) + 1
        if n <= target + 2 and (best is None or stop - start < best[1] - best[0]):
            best = (start, stop, step, n)
    start, stop, step, n = best
    return start, stop, [round(start + i * step, 10) for i in range(n)]


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], x_label: str,
               y_label: str, markers: Sequence[tuple[float, float, str]] = (),
               width: int = 460, height: int = 250, y_range: tuple[float, float] | None = None,
               lines: bool = True, x_ticks: Sequence[str] | None = None) -> str:
    """Small SVG chart; series: name -> (xs, ys); markers: (x, y, label). `lines=False`
    draws points only (a scatter); `x_ticks` labels x = 0, 1, ... (categories)."""
    colors = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed"]
    xs = [x for s in series.values() for x in s[0]]
    ys = [y for s in series.values() for y in s[1] if y is not None and np.isfinite(y)]
    if not xs or not ys:
        return "<p class='muted'>no data</p>"
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range or (min(ys), max(ys))
    if x_ticks is None:
        x0, x1, x_values = nice_ticks(x0, x1)
    if y_range is None:
        y0, y1, y_values = nice_ticks(y0, y1)
    else:
        y_values = [v for v in nice_ticks(y0, y1)[2] if y0 - 1e-9 <= v <= y1 + 1e-9]
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    L, R, T, B = 48, 12, 14, 36
    def px(x): return L + (x - x0) / (x1 - x0) * (width - L - R)
    def py(y): return height - B - (y - y0) / (y1 - y0) * (height - T - B)
    parts = [f"<svg viewBox='0 0 {width} {height}' class='chart' role='img'>"]
    for yv in y_values:
        parts.append(f"<line x1='{L}' x2='{width - R}' y1='{py(yv):.1f}' y2='{py(yv):.1f}' "
                     "class='grid'/>")
        parts.append(f"<text x='{L - 6}' y='{py(yv) + 4:.1f}' class='tick' "
                     f"text-anchor='end'>{yv:.4g}</text>")
    ticks = ([(i, t) for i, t in enumerate(x_ticks)] if x_ticks is not None else
             [(v, None) for v in x_values])
    for xv, label in ticks:
        label = f"{xv:.4g}" if label is None else label
        parts.append(f"<text x='{px(xv):.1f}' y='{height - B + 16}' class='tick' "
                     f"text-anchor='middle'>{html.escape(label)}</text>")
    parts.append(f"<text x='{(L + width - R) / 2}' y='{height - 4}' class='axis' "
                 f"text-anchor='middle'>{html.escape(x_label)}</text>")
    parts.append(f"<text x='12' y='{(T + height - B) / 2}' class='axis' text-anchor='middle' "
                 f"transform='rotate(-90 12 {(T + height - B) / 2})'>"
                 f"{html.escape(y_label)}</text>")
    for i, (name, (sx, sy)) in enumerate(series.items()):
        c = colors[i % len(colors)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy)
                       if y is not None and np.isfinite(y))
        if lines:
            parts.append(f"<polyline points='{pts}' fill='none' stroke='{c}' "
                         "stroke-width='2.2'/>")
        for x, y in zip(sx, sy):
            if y is not None and np.isfinite(y):
                parts.append(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='2.6' fill='{c}'/>")
        parts.append(f"<text x='{width - R - 4}' y='{T + 14 + 16 * i}' text-anchor='end' "
                     f"class='legend' fill='{c}'>{html.escape(name)}</text>")
    for x, y, label in markers:
        parts.append(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='6' class='marker'/>")
        parts.append(f"<text x='{px(x) + 8:.1f}' y='{py(y) - 8:.1f}' class='mlabel'>"
                     f"{html.escape(label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- page

CSS = """
:root{--ink:#0f172a;--muted:#64748b;--line:#e2e8f0;--card:#fff;--bg:#f1f5f9;--acc:#2563eb}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,
sans-serif;color:var(--ink);background:var(--bg)}header{background:#0f172a;color:#fff;
padding:22px 32px}header h1{margin:0;font-size:22px;font-weight:650}header .sub{color:#94a3b8;
margin-top:4px;font-size:13px}main{padding:24px 32px;max-width:1400px;margin:auto}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:18px 20px;
margin-bottom:20px}h2{font-size:16px;margin:0 0 12px}.cards{display:grid;
grid-template-columns:repeat(auto-fit,minmax(180px,1fr));gap:14px;margin-bottom:20px}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:14px 16px}
.card .v{font-size:28px;font-weight:700}.card .k{color:var(--muted);font-size:12px;
text-transform:uppercase;letter-spacing:.04em}.card .d{color:var(--muted);font-size:12px}
.row2{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:20px}
table{border-collapse:collapse;width:100%}th,td{padding:6px 10px;border-bottom:1px solid
var(--line);text-align:right;white-space:nowrap}th{font-size:12px;color:var(--muted);
font-weight:600;text-transform:uppercase}td:first-child,th:first-child{text-align:left}
.sw{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:8px;
vertical-align:-1px;border:1px solid #0002}.bar{display:inline-block;height:8px;
border-radius:4px;background:var(--acc);vertical-align:middle}.bar.seed{background:#94a3b8}
.pos{color:#059669}.neg{color:#dc2626}.muted{color:var(--muted)}
.chart{width:100%;max-width:680px;height:auto}.chart .grid{stroke:#e2e8f0}
.chart .tick{font-size:10px;fill:#64748b}.chart .axis{font-size:11px;fill:#334155}
.chart .legend{font-size:11px;font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:4px;
stroke-linejoin:round}.chart .marker{fill:none;stroke:#0f172a;stroke-width:1.5}.chart .mlabel{
font-size:10px;fill:#0f172a}.gallery{display:flex;flex-direction:column;gap:18px}
.item{border-top:1px solid var(--line);padding-top:14px}.item h3{font-size:13px;margin:0 0 8px;
font-weight:600}.item h3 .iou{color:var(--muted);font-weight:400;margin-left:10px}
.strip{display:flex;gap:10px;overflow-x:auto}figure{margin:0;text-align:center}
figure img{display:block;border-radius:8px;border:1px solid var(--line);image-rendering:auto}
figcaption{font-size:11px;color:var(--muted);margin-top:4px}.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));
gap:10px;margin-top:12px}.legendrow{display:flex;
flex-wrap:wrap;gap:12px;font-size:12px;margin-bottom:10px}
"""


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{100 * x:.1f}"


def _class_table(ev: dict, info: DatasetInfo, model: dict | None = None,
                 walk: dict | None = None) -> str:
    """Per class: seed IoU, CRF IoU, their difference, CRF F1, and the random-walk
    masks' and the segmentation model's IoU on the same split when scored there."""
    seeds = ev["cams"]["best"]["per_class"]
    crf = ev["crf"]["per_class"]
    model_pc = (model or {}).get("per_class", {})
    walk_pc = (walk or {}).get("per_class", {})
    rows = []
    for i, name in enumerate(info.label_names):
        if name not in crf:
            continue
        s, c = seeds.get(name, {}).get("iou"), crf[name]["iou"]
        color = "#%02x%02x%02x" % tuple(PALETTE[i])
        delta = "" if s is None or c is None else (
            f"<span class='{'pos' if c >= s else 'neg'}'>{100 * (c - s):+.1f}</span>")
        bar = "" if c is None else f"<span class='bar' style='width:{120 * c:.0f}px'></span>"
        sbar = "" if s is None else f"<span class='bar seed' style='width:{120 * s:.0f}px'></span>"
        rows.append(f"<tr><td><span class='sw' style='background:{color}'></span>"
                    f"{html.escape(name)}</td><td>{_pct(s)}</td><td style='text-align:left'>"
                    f"{sbar}</td><td>{_pct(c)}</td><td style='text-align:left'>{bar}</td>"
                    f"<td>{delta}</td><td>{_pct(crf[name]['f1'])}</td>"
                    + (f"<td>{_pct(walk_pc.get(name, {}).get('iou'))}</td>" if walk else "")
                    + (f"<td>{_pct(model_pc.get(name, {}).get('iou'))}</td>" if model else "")
                    + f"<td>{crf[name]['gt_pixels']:,}</td></tr>")
    rows.append(f"<tr><th>mean</th><th>{_pct(ev['cams']['best']['miou'])}</th><th></th>"
                f"<th>{_pct(ev['crf']['miou'])}</th><th></th><th></th>"
                f"<th>{_pct(ev['crf']['mean_f1'])}</th>"
                + (f"<th>{_pct(walk['miou'])}</th>" if walk else "")
                + (f"<th>{_pct(model['miou'])}</th>" if model else "") + "<th></th></tr>")
    return ("<table><tr><th>class</th><th>seed IoU</th><th></th><th>CRF IoU</th><th></th>"
            "<th>Δ</th><th>CRF F1</th>" + ("<th>random-walk IoU</th>" if walk else "")
            + ("<th>model IoU</th>" if model else "")
            + "<th>GT pixels</th></tr>" + "".join(rows) + "</table>")


def _image_iou(gt: np.ndarray, pred: np.ndarray, classes: Sequence[int]) -> float:
    valid = gt != 255
    ious = []
    for c in classes:
        g, p = (gt == c) & valid, (pred == c) & valid
        union = (g | p).sum()
        if union:
            ious.append((g & p).sum() / union)
    return float(np.mean(ious)) if ious else float("nan")


def _gallery_item(row: dict, info: DatasetInfo) -> str:
    image = decode_image(row["image"], row["image_id"])
    cams = decode_array(row["cam"]).astype(np.float32)
    classes = vector_to_labels(row["label_vector"])
    seed = decode_mask(row["seed"])
    pseudo = decode_mask(row["pseudo_mask"])
    gt = decode_mask(row["mask"]) if row.get("mask") is not None else None
    figs = [("image", _thumb(image), False)]
    if row.get("prior") is not None:  # the loop's prior M_T that the last classifier saw
        prior = decode_array(row["prior"]).astype(np.float32) / 255
        figs.append(("prior M", _thumb(heatmap_overlay(image, prior.max(0))), False))
    for cam, c in zip(cams, classes):
        figs.append((f"CAM: {info.label_names[c]}", _thumb(heatmap_overlay(image, cam)), False))
    figs.append(("seed", _thumb(mask_overlay(image, seed), True), True))
    figs.append(("CRF pseudo mask", _thumb(mask_overlay(image, pseudo), True), True))
    walk = decode_mask(row["rw_mask"]) if row.get("rw_mask") is not None else None
    if walk is not None:
        figs.append(("random-walk mask", _thumb(mask_overlay(image, walk), True), True))
    if row.get("saliency") is not None:  # C²AM-H: the class-agnostic map and its mask
        saliency = decode_mask(row["saliency"]).astype(np.float32) / 255
        figs.append(("C²AM saliency", _thumb(heatmap_overlay(image, saliency)), False))
    if row.get("saliency_mask") is not None:
        figs.append(("saliency mask", _thumb(mask_overlay(
            image, decode_mask(row["saliency_mask"]))), True))
    if row.get("boundary") is not None:  # the affinity network's, at stride 4
        boundary = cv2.resize(decode_mask(row["boundary"]), image.shape[1::-1],
                              interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
        figs.append(("boundary map", _thumb(heatmap_overlay(image, boundary)), False))
    pred = decode_mask(row["prediction"]) if row.get("prediction") is not None else None
    if pred is not None:
        figs.append(("segmentation model", _thumb(mask_overlay(image, pred), True), True))
    if gt is not None:
        figs.append(("ground truth", _thumb(mask_overlay(image, gt), True), True))
    iou = ""
    if gt is not None:
        keys = list(classes) + ([0] if info.background else [])
        model = (f" · model {_pct(_image_iou(gt, pred, keys))}" if pred is not None else "")
        rw = (f" · random walk {_pct(_image_iou(gt, walk, keys))}" if walk is not None
              else "")
        iou = (f"<span class='iou'>image mIoU: seed {_pct(_image_iou(gt, seed, keys))} · "
               f"CRF {_pct(_image_iou(gt, pseudo, keys))}{rw}{model}</span>")
    names = ", ".join(info.label_names[c] for c in classes)
    strip = "".join(f"<figure><img src='{_png_uri(p)}' alt='{html.escape(t)}'>"
                    f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, p, _ in figs)
    return (f"<div class='item'><h3>{html.escape(str(row['image_id']))} — "
            f"{html.escape(names)}{iou}</h3><div class='strip'>{strip}</div></div>")


def sample_rows(ctx, split: str, n: int) -> list[dict]:
    """n rows (evenly spaced over the sorted ids of `split`, ground truth preferred) with
    image, CAM, seed, pseudo mask, mask and the segmentation model's prediction. Only
    the id and split columns are read in full; the pictures are read for the chosen ids
    alone, joined on image_id."""
    from .data.join import read_joined

    crf_path, cam_path = ctx.input("crf"), ctx.input("cams")
    index = read_table(crf_path, ["image_id", "mask"], [split])
    ids = index.column("image_id").to_pylist()
    has_gt = index.column("mask").is_valid().to_pylist()
    pool = sorted(i for i, g in zip(ids, has_gt) if g) or sorted(ids)
    if not pool:
        return []
    chosen = sorted(evenly_spaced(pool, n))
    sources = [(ctx.dataset_path, ["image", "label_vector", "mask"]), (cam_path, ["cam"]),
               (crf_path, ["seed", "pseudo_mask"])]
    predictions = ctx.input("predict")
    if storage.exists(predictions):
        sources.append((predictions, ["prediction"]))
    rounds = ctx.config.loop.rounds
    if rounds > 1 and ctx.config.loop.feedback == "prior":
        from .graph import Step
        prior = ctx.run.step_path(Step("prior", rounds))
        if storage.exists(prior):
            sources.append((prior, ["prior"]))
    if ctx.has_input("random_walk"):
        sources.append((ctx.input("random_walk"), ["rw_mask", "boundary"]))
    if ctx.has_input("saliency"):
        sources.append((ctx.input("saliency"), ["saliency", "saliency_mask"]))
    return read_joined(sources, chosen)


def explain_section(run, info: DatasetInfo) -> str:
    """The `ray-wsss explain` comparison: its table and, for a few images, every
    method's map of every class of the image, side by side."""
    path = run.path("explain", "comparison.json")
    if not storage.exists(path):
        return ""
    comp = storage.read_json(path)
    cols = [("IC ↑", "increase_in_confidence"), ("AD ↓", "average_drop"),
            ("AR ↑", "average_retention"), ("ADO ↑", "average_drop_of_others"),
            ("ARO ↓", "average_retention_of_others"), ("ROAD MoRF ↓", "road_morf"),
            ("ROAD LeRF ↑", "road_lerf"), ("deletion AUC ↓", "deletion_auc"),
            ("insertion AUC ↑", "insertion_auc"), ("box acc. ↑", "box_accuracy"),
            ("seed mIoU ↑", "seed_miou"),
            ("img/s", "images_per_second")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    body = "".join(
        f"<tr><td>{html.escape(r['method'])}</td>" + "".join(
            f"<td>{'–' if r.get(k) is None else f'{r[k]:.1f}'}</td>" for _, k in cols)
        + "</tr>" for r in comp["rows"])
    table = f"<table><tr><th>method</th>{head}</tr>{body}</table>"
    samples = read_table(run.path("explain"), ["image_id", "method", "cam"]).to_pylist()
    ids = sorted({s["image_id"] for s in samples})
    images = {r["image_id"]: r for r in read_table(
        run.dataset_path, ["image_id", "image", "label_vector"], ids=ids).to_pylist()}
    methods = [r["method"] for r in comp["rows"]]
    by_key = {(s["image_id"], s["method"]): decode_array(s["cam"]).astype(np.float32)
              for s in samples}
    strips = []
    for image_id in ids:
        image = decode_image(images[image_id]["image"], image_id)
        classes = vector_to_labels(images[image_id]["label_vector"])
        for j, c in enumerate(classes):
            figs = [("image", _thumb(image))]
            for m in methods:
                maps = by_key.get((image_id, m))
                if maps is not None and j < len(maps):
                    figs.append((m, _thumb(heatmap_overlay(image, maps[j]))))
            strip = "".join(f"<figure><img src='{_png_uri(p)}' alt='{html.escape(t)}'>"
                            f"<figcaption>{html.escape(t)}</figcaption></figure>"
                            for t, p in figs)
            strips.append(f"<div class='item'><h3>{html.escape(image_id)} — "
                          f"{html.escape(info.label_names[c])}</h3>"
                          f"<div class='strip'>{strip}</div></div>")
    note = (f"{comp['images']} images of {', '.join(comp['splits'])}; XAI metrics in %, over "
            "each image's detected classes (IC: increase in confidence, AD: average drop, "
            "AR: average retention, ADO/ARO: drop/retention of the other detected classes); "
            "seed mIoU at each method's best background threshold"
            + (", KUR head" if comp.get("kur") else "") + ".")
    return (f"<section><h2>Explaining methods compared</h2><p class='muted'>"
            f"{html.escape(note)}</p>{table}<div class='gallery'>{''.join(strips)}</div>"
            "</section>")


def sweep_sections(run) -> str:
    """One section per Tune sweep of the run: best trials and metric-vs-parameter plots."""
    out = []
    for name in storage.listdir(run.path("sweeps")):
        path = run.path("sweeps", name, "results.json")
        if not storage.exists(path):
            continue
        res = storage.read_json(path)
        trials = [t for t in res["trials"] if t.get("metric") is not None]
        if not trials:
            continue
        sign = -1 if res["mode"] == "max" else 1
        trials.sort(key=lambda t: sign * t["metric"])
        keys = list(res["space"])
        base = res.get("base") or {}
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)

        def cell(v):
            return f"{v:.4g}" if isinstance(v, float) else html.escape(json.dumps(v))
        body = "".join(
            f"<tr><td>{i + 1}{' (base)' if t.get('trial') == base.get('trial') else ''}</td>"
            f"<td>{t['metric']:.3f}</td>" + "".join(f"<td>{cell(t['params'][k])}</td>"
                                                     for k in keys) + "</tr>"
            for i, t in enumerate(trials[:8]))
        charts = []
        for k in keys:
            values = [t["params"][k] for t in trials]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                xs, ticks = values, None
            else:
                cats = sorted({json.dumps(v) for v in values})
                xs, ticks = [cats.index(json.dumps(v)) for v in values], cats
            charts.append(line_chart({res["metric"]: (xs, [t["metric"] for t in trials])},
                                     k, res["metric"], lines=False, width=340, height=220,
                                     x_ticks=ticks))
        base_txt = (f"; the base config scores {base['metric']:.3f}"
                    if base.get("metric") is not None else "")
        out.append(
            f"<section><h2>Sweep {html.escape(name)}</h2><p class='muted'>"
            f"{len(res['trials'])} trials of the {html.escape(res['trainable'])} trainable, "
            f"{html.escape(res['search'])} search, {html.escape(res['metric'])} "
            f"({res['mode']}){base_txt}. Best config: sweeps/{html.escape(name)}/best.yaml"
            f"</p><table><tr><th>rank</th><th>{html.escape(res['metric'])}</th>{head}</tr>"
            f"{body}</table><div class='charts'>{''.join(charts)}</div></section>")
    return "".join(out)


def round_curves(metrics: dict) -> dict:
    """Per round t (metrics keys `evaluate@t`, `predict@t`): seed, CRF and segmentation
    model mIoU in %, None where a round has no such step (self-training rounds make no
    new pseudo masks)."""
    rounds = sorted({1} | {int(k.partition("@")[2]) for k in metrics
                           if k.partition("@")[2].isdigit()})
    out = {"round": rounds, "CAM seeds": [], "CRF pseudo masks": [],
           "segmentation model": []}
    for t in rounds:
        sfx = "" if t == 1 else f"@{t}"
        ev, pred = metrics.get(f"evaluate{sfx}"), metrics.get(f"predict{sfx}", {})
        out["CAM seeds"].append(100 * ev["cams"]["best"]["miou"] if ev else None)
        out["CRF pseudo masks"].append(100 * ev["crf"]["miou"] if ev else None)
        scores = pred.get("scores", {})
        split = next(iter(scores), None)
        out["segmentation model"].append(100 * scores[split]["prediction"]["miou"]
                                         if split else None)
    return out


def render_page(run, info: DatasetInfo, metrics: dict, rows: list[dict],
                predicted: dict | None = None, segmenter: dict | None = None,
                curves: dict | None = None) -> str:
    """`predicted`: the predict step's metrics, `segmenter`: the segmenter step's,
    `curves`: the per-round scores (`round_curves` of the whole metrics.json)."""
    cfg = run.config
    ev = metrics.get("evaluate", {})
    cls = metrics.get("classifier", {})
    scores = (predicted or {}).get("scores", {})
    # the model's scores on the split the pseudo masks were scored on, for the table
    model_same = next((scores[s]["prediction"] for s in (ev.get("splits") or [])
                       if s in scores), None)
    walked = (metrics.get("random_walk") or {}).get("scores", {})
    walk_same = next((walked[s]["rw_mask"] for s in (ev.get("splits") or []) if s in walked),
                     None)
    cards = []
    if ev:
        t = ev["cams"]["best_threshold"]
        cards += [
            ("CAM seeds mIoU", _pct(ev["cams"]["best"]["miou"]),
             f"best threshold {t}" if t is not None else "argmax over classes"),
            ("CRF pseudo masks mIoU", _pct(ev["crf"]["miou"]),
             f"pixel accuracy {_pct(ev['crf']['pixel_accuracy'])}"),
            ("CRF mean F1", _pct(ev["crf"]["mean_f1"]), f"seeds {_pct(ev['seeds']['mean_f1'])}"),
            ("images evaluated", str(ev["images"]), f"split {', '.join(ev['splits'])}"),
        ]
    if walk_same is not None:
        cards.append(("random-walk masks mIoU", _pct(walk_same["miou"]),
                      f"pixel accuracy {_pct(walk_same['pixel_accuracy'])}"))
    salient = (metrics.get("saliency") or {}).get("scores", {})
    sal_same = next((salient[s] for s in (ev.get("splits") or []) if s in salient),
                    next(iter(salient.values()), None))
    if sal_same is not None and sal_same.get("fg_iou") is not None:
        cards.append(("C²AM saliency: foreground IoU", _pct(sal_same["fg_iou"]),
                      f"precision {_pct(sal_same['fg_precision'])} · recall "
                      f"{_pct(sal_same['fg_recall'])}"))
    for split, m in scores.items():
        cards.append((f"segmentation model mIoU ({split})", _pct(m["prediction"]["miou"]),
                      f"pixel accuracy {_pct(m['prediction']['pixel_accuracy'])} · "
                      f"{m.get('images', '?')} images"))
    if cls.get("val_map") is not None:
        cards.append(("classifier val mAP", f"{cls['val_map']:.1f}",
                      f"{cls.get('epoch')} epochs · {cfg.model.backbone}"))
    cards_html = "".join(f"<div class='card'><div class='k'>{k}</div><div class='v'>{v}</div>"
                         f"<div class='d'>{html.escape(d)}</div></div>" for k, v, d in cards)
    charts = ""
    if ev and ev["cams"]["thresholds"]:
        th, curve = ev["cams"]["thresholds"], [100 * v for v in ev["cams"]["miou_curve"]]
        best = ev["cams"]["best_threshold"]
        charts += ("<section><h2>CAM seeds: mIoU against the background threshold</h2>"
                   + line_chart({"seed mIoU": (th, curve)}, "background threshold", "mIoU (%)",
                                [(best, max(curve), f"best {best}")])
                   + "</section>")
    hist = cls.get("history") or []
    if hist:
        ep = [h["epoch"] for h in hist]
        series = {"train loss ×100": (ep, [100 * h["loss"] for h in hist])}
        if any("val_map" in h for h in hist):
            series["val mAP"] = (ep, [h.get("val_map") for h in hist])
        charts += ("<section><h2>Classifier training</h2>"
                   + line_chart(series, "epoch", "value") + "</section>")
    rounds = curves or round_curves(metrics)
    if len(rounds["round"]) > 1:
        t = rounds["round"]
        series = {k: (t, v) for k, v in rounds.items() if k != "round"
                  and any(x is not None for x in v)}
        charts += ("<section><h2>Iterative loop: mIoU per round</h2>"
                   + line_chart(series, "round", "mIoU (%)") + "</section>")
    seg_hist = (segmenter or {}).get("history") or []
    if seg_hist:
        ep = [h["epoch"] for h in seg_hist]
        series = {"train loss ×100": (ep, [100 * h["loss"] for h in seg_hist])}
        if any("val_miou" in h for h in seg_hist):
            series["val mIoU (letterboxed)"] = (ep, [h.get("val_miou") for h in seg_hist])
        charts += ("<section><h2>Segmentation model training</h2>"
                   + line_chart(series, "epoch", "value") + "</section>")
    legend = "".join(f"<span><span class='sw' style='background:#%02x%02x%02x'></span>%s</span>"
                     % (*PALETTE[i], html.escape(n)) for i, n in enumerate(info.label_names)
                     if i > 0 or info.background)
    gallery = "".join(_gallery_item(r, info) for r in rows)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    sub = (f"{html.escape(run.root)} · {len(info.classes)} classes · backbone "
           f"{html.escape(cfg.model.backbone)} · CAM method {html.escape(cfg.cams.method)}, "
           f"scales {', '.join(map(str, cfg.cams.scales))}{' + flip' if cfg.cams.flip else ''}"
           f" · CRF {cfg.crf.iterations} iterations · {when}")
    best = ev["cams"]["best_threshold"] if ev else None
    # without a background class there is no threshold: seeds are the argmax
    seed_rule = f"best threshold {best}" if best is not None else "argmax over the classes"
    table = (f"<section><h2>Per-class IoU on {html.escape(', '.join(ev['splits']))}: CAM seeds "
             f"({seed_rule}) vs CRF pseudo masks"
             f"{' vs random-walk masks' if walk_same else ''}"
             f"{' vs the segmentation model' if model_same else ''}</h2>"
             f"{_class_table(ev, info, model_same, walk_same)}</section>"
             if ev else "")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>ray-wsss report</title><style>{CSS}</style></head><body>"
            f"<header><h1>ray-wsss: weakly supervised segmentation report</h1>"
            f"<div class='sub'>{sub}</div></header><main>"
            f"<div class='cards'>{cards_html}</div>"
            f"<div class='row2'>{charts}</div>{table}{explain_section(run, info)}"
            f"{sweep_sections(run)}"
            f"<section><h2>Samples</h2><div class='legendrow'>{legend}</div>"
            f"<div class='gallery'>{gallery or '<p class=muted>no images</p>'}</div></section>"
            f"</main></body></html>")


def run(config, ctx) -> dict:
    info = ctx.dataset_info()
    rows = sample_rows(ctx, config.report.split, config.report.num_images)
    from .graph import Step, last_round

    metrics = dict(ctx.run.read_metrics())
    curves = round_curves(metrics)
    # the cards and tables show the last round's steps (the run's output); the per-round
    # curves read every round
    metrics["evaluate"] = ctx.metrics("evaluate")
    metrics["random_walk"] = ctx.metrics("random_walk") if ctx.has_input("random_walk") else {}
    metrics["saliency"] = ctx.metrics("saliency") if ctx.has_input("saliency") else {}
    last = Step("classifier", last_round("classifier", config.loop)).key
    metrics["classifier"] = metrics.get(last, metrics.get("classifier", {}))
    segmenter = Step("segmenter", last_round("segmenter", config.loop)).key
    page = render_page(ctx.run, info, metrics, rows, ctx.metrics("predict"),
                       metrics.get(segmenter, {}), curves)
    with ctx.output() as out:
        storage.write_bytes_atomic(storage.join(out, "index.html"), page.encode("utf-8"))
    return {"path": storage.join(ctx.path, "index.html"), "images": len(rows)}
