"""Galleries of adversarial examples: what each attack changed, where the network is sensitive, and how they meet.

From an evaluation's :class:`~advtrain.evaluation.interpretability.InterpretabilityResult`
(``evaluate_robustness(interpretability=True)``):

* one figure per attack (:func:`attack_figure`), a row per sample: the clean image (true class), the adversarial
  image (adversarial class), the perturbation δ (signed, diverging colour map centred at 0), the adversarial
  saliency map with ``B_ASM(ν)`` at the largest ν overlaid, the part of δ inside ``B_ASM(ν)`` (with its IS), and the
  CAM or Grad-CAM of the true class over the clean image (with the CAM-based IS), as seed 002's Fig. 3 and A2 show
  them;
* one figure comparing the attacks on the same samples (:func:`comparison_figure`): a row per sample, a column per
  attack that broke one of them (its perturbation), on one colour scale per row.

Colour images show δ, the ASM and ``B_ASM`` summed (``B``: any channel) over the channels. Images are drawn with
nearest interpolation, so MNIST's 28×28 pixels stay pixels. Figures are bare :class:`matplotlib.figure.Figure`
objects, outside pyplot (the caller's backend is left alone).
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import numpy as np
from torch import Tensor

from advtrain.evaluation.interpretability import GalleryItem, InterpretabilityResult, boolean_map

__all__ = ["attack_figure", "comparison_figure", "figure_array", "gallery_figures", "write_galleries"]

_CELL = 2.0  # inches per image
_DPI = 100
_DIVERGING = "RdBu_r"  # red: δ > 0 (brighter), blue: δ < 0 (darker), white: unchanged


def file_stem(name: str) -> str:
    """A file-name-safe form of an attack's label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _image(t: Tensor) -> tuple[np.ndarray, str | None]:
    if t.shape[0] == 3:
        return t.permute(1, 2, 0).clamp(0, 1).numpy(), None
    return t.mean(0).numpy(), "gray"


def _show(ax, t: Tensor) -> None:
    array, cmap = _image(t)
    ax.imshow(array, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")


def _signed(ax, values: np.ndarray, scale: float):
    return ax.imshow(values, cmap=_DIVERGING, vmin=-scale, vmax=scale, interpolation="nearest")


def _clean_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _sizes(item: GalleryItem) -> str:
    delta = (item.adv - item.x).flatten()
    return f"‖δ‖₂ {float(delta.norm()):.2f}, ‖δ‖∞ {float(delta.abs().max()):.2f}"


def _saliency(ax, item: GalleryItem, mask: Tensor) -> None:
    """The ASM over a faint clean image, darker = larger as in seed 002's figures, coloured by rank among the
    positive scores (they are so heavy-tailed that a linear scale shows a few pixels only; B is defined by
    percentiles too), with the outline of ``B_ASM`` drawn along pixel edges; zero scores are left blank."""
    asm = item.asm.sum(0).numpy()
    rank = np.argsort(np.argsort(asm, axis=None, kind="stable"), kind="stable").reshape(asm.shape)
    positive = int((asm > 0).sum())
    clean, _ = _image(item.x)
    faint = 1.0 - 0.25 * (clean.mean(-1) if clean.ndim == 3 else clean)  # the digit in light grey on white
    ax.imshow(faint, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    heat = np.where(asm > 0, (rank + 1 - (asm.size - positive)) / max(positive, 1), 0.0)
    ax.imshow(np.ma.masked_where(heat <= 0, heat), cmap="YlOrRd", vmin=0, vmax=1, interpolation="nearest")
    fine = 8  # contour on a finer nearest-neighbour copy, so the outline follows pixel edges
    grid = np.kron(mask.numpy().astype(float), np.ones((fine, fine)))
    height, width = mask.shape
    xs = (np.arange(width * fine) + 0.5) / fine - 0.5
    ys = (np.arange(height * fine) + 0.5) / fine - 0.5
    if grid.any():
        ax.contour(xs, ys, grid, levels=[0.5], colors="#0040ff", linewidths=1.2)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)


def _score(result: InterpretabilityResult, name: str, kind: str, index: int) -> float:
    scores = result.scores[name]
    where = (scores["index"] == index).nonzero()
    return float(scores[kind][int(where[0, 0]), -1]) if where.numel() else math.nan


def attack_figure(result: InterpretabilityResult, name: str):
    """The gallery of one attack (``None`` when it broke none of the kept samples); see the module docstring."""
    from matplotlib.figure import Figure

    indices = result.gallery.get(name, [])
    if not indices:
        return None
    nu = result.percentiles[-1]
    cam_name = {"cam": "CAM", "grad_cam": "Grad-CAM"}.get(result.method or "", None)
    columns = 6 if cam_name else 5
    fig = Figure(figsize=(columns * _CELL, len(indices) * _CELL + 0.8), dpi=_DPI)
    axes = np.atleast_2d(fig.subplots(len(indices), columns, squeeze=False))
    for row, index in enumerate(indices):
        item = result.examples[name][index]
        delta = (item.adv - item.x).sum(0).numpy()
        scale = float(np.abs(delta).max()) or 1.0
        mask = boolean_map(item.asm[None], [nu])[0, 0].any(0)
        ax = axes[row]
        _show(ax[0], item.x)
        ax[0].set_title(f"#{index} clean: class {item.label}", fontsize=9)
        _show(ax[1], item.adv)
        ax[1].set_title(f"adversarial: class {item.adv_class}", fontsize=9)
        image = _signed(ax[2], delta, scale)
        fig.colorbar(image, ax=ax[2], fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
        ax[2].set_title(f"δ  ({_sizes(item)})", fontsize=8)
        _saliency(ax[3], item, mask)
        ax[3].set_title(f"ASM({item.adv_class} vs {item.label}); B at ν={nu:g}", fontsize=8)
        _signed(ax[4], np.where(mask.numpy(), delta, 0.0), scale)
        ax[4].set_title(f"B∘δ: IS_ASM({nu:g}) = {_score(result, name, 'asm', index):.2f}", fontsize=8)
        if cam_name:
            cam = item.cam[0]
            span = float(cam.max() - cam.min()) or 1.0
            _show(ax[5], item.x)
            ax[5].imshow(((cam - cam.min()) / span).numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1,
                         interpolation="nearest")  # fmt: skip
            ax[5].set_title(f"{cam_name} of {item.label}: IS({nu:g}) = {_score(result, name, 'cam', index):.2f}",
                            fontsize=8)  # fmt: skip
        for a in ax:
            _clean_axes(a)
    fig.suptitle(f"{name}: adversarial examples ({result.norm} threat model)\nδ: red = brighter, blue = darker.  "
                 f"ASM (> 0): darker = larger; blue outline = B_ASM, the pixels above its {nu:g}th percentile",
                 fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (len(indices) * _CELL + 0.8)))
    return fig


def comparison_figure(result: InterpretabilityResult):
    """The attacks' perturbations of the same samples side by side (``None`` without a sample): a row per sample,
    the clean image then one column per attack that broke one of them, all on the row's colour scale."""
    from matplotlib.figure import Figure

    indices = result.comparison
    if not indices:
        return None
    names = [name for name in result.attacks if any(i in result.examples.get(name, {}) for i in indices)]
    height = len(indices) * (_CELL + 0.45) + 0.6
    fig = Figure(figsize=((len(names) + 1) * _CELL, height), dpi=_DPI)
    axes = np.atleast_2d(fig.subplots(len(indices), len(names) + 1, squeeze=False))
    for row, index in enumerate(indices):
        items = {name: result.examples[name].get(index) for name in names}
        deltas = {name: (it.adv - it.x).sum(0).numpy() for name, it in items.items() if it is not None}
        scale = max((float(np.abs(d).max()) for d in deltas.values()), default=1.0) or 1.0
        first = next(it for it in items.values() if it is not None)
        _show(axes[row, 0], first.x)
        axes[row, 0].set_title(f"#{index} clean: class {first.label}\nδ scale ±{scale:.2f}", fontsize=8)
        for col, name in enumerate(names, start=1):
            ax, item = axes[row, col], items[name]
            if item is None:
                ax.imshow(np.ones(first.x.shape[1:]), cmap="gray", vmin=0, vmax=1)  # the cell keeps the image's shape
                ax.text(0.5, 0.5, "not broken here\n(or, in the cascade,\nby an earlier attack)", ha="center",
                        va="center", fontsize=7, color="grey", transform=ax.transAxes)  # fmt: skip
                ax.set_title(name, fontsize=8)
            else:
                _signed(ax, deltas[name], scale)
                ax.set_title(f"{name}: → class {item.adv_class}\n{_sizes(item)}", fontsize=7)
            _clean_axes(ax)
        _clean_axes(axes[row, 0])
    title = f"Perturbations of the same samples per attack ({result.norm}); red = brighter, blue = darker, one colour "
    title += "scale per row"
    lines = textwrap.wrap(title, width=int(12 * (len(names) + 1) * _CELL))  # about 12 characters an inch at 10 pt
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.2 + 0.17 * len(lines)) / height))
    return fig


def gallery_figures(result: InterpretabilityResult) -> dict[str, object]:
    """``{file stem: figure}``: ``gallery_attacks`` (the comparison) and ``gallery_<attack>`` per attack that broke
    a kept sample."""
    figures = {}
    comparison = comparison_figure(result)
    if comparison is not None:
        figures["gallery_attacks"] = comparison
    for name in result.attacks:
        fig = attack_figure(result, name)
        if fig is not None:
            figures[f"gallery_{file_stem(name)}"] = fig
    return figures


def write_galleries(result: InterpretabilityResult, folder: str | Path) -> list[Path]:
    """Writes :func:`gallery_figures` as PNGs into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in gallery_figures(result).items():
        path = folder / f"{stem}.png"
        fig.savefig(path, dpi=_DPI)
        paths.append(path)
    return paths


def figure_array(fig) -> np.ndarray:
    """The figure rendered as an (H, W, 3) uint8 array (for ``WandbLogger.log_image``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
