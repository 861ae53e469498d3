"""The reports' figures: line panels with matplotlib (the Agg backend: files, no display) and image grids with PIL.

Every stage's report draws with these: `plot_panels` (RL's reward-vs-FID trade-off, experiments.py's sweeps),
`pyplot` (the 2-D lesson's own figure), `save_class_grid` and `save_titled_grids` (samples, one row per class).
Each function depends only on its arguments (and torch, matplotlib or PIL): copy any one of them on its own.
"""
import os

import torch

# One colour per series, in order, in every figure of the project: where a figure has a teacher it is the first
# series (blue) and the student the second (orange), so a reader can follow them across figures.
PALETTE = ("steelblue", "darkorange", "seagreen", "firebrick", "purple")


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures are written to files, never shown, so no display is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_panels(panels, path, size=(5.2, 4.0), dpi=100):
    """Save side-by-side line panels as one PNG of len(panels) * size inches at `dpi`. Each panel is a dict: title,
    xlabel, ylabel (with units), and series, a list of (name, points) with points [(x, y, label or None), ...] joined
    in order, each label written beside its point (the cfg or K a point was measured at); optionally ylim (low, high),
    xscale / yscale ("log"), xticks (values to label), label_offsets ((dx, dy) in points for the first and second
    series' labels), hline (y, text): a reference line such as a floor, and note: a line of numbers under the axes.
    Every panel has ticks, tick labels, a grid and a legend."""
    plt = pyplot()
    # One row of axes, one per panel; squeeze=False keeps `axes` two-dimensional even for a single panel.
    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels), size[1]), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for j, (name, series) in enumerate(panel["series"]):
            if not series:
                continue
            xs, ys = [p[0] for p in series], [p[1] for p in series]
            ax.plot(xs, ys, "o-", color=PALETTE[j % len(PALETTE)], label=name, markersize=5, linewidth=1.5)
            for x, y, label in series:
                if label is not None:
                    dx, dy = panel.get("label_offsets", ((5, 5), (5, -12)))[j % 2]  # points; dx < 0: left
                    ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                                ha="right" if dx < 0 else "left", color=PALETTE[j % len(PALETTE)])
        if "hline" in panel:
            y, text = panel["hline"]
            ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=text)
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
        ax.title.set_fontsize(10)
        if panel.get("xscale"):
            ax.set_xscale(panel["xscale"])
        if panel.get("yscale"):
            ax.set_yscale(panel["yscale"])
        if panel.get("xticks"):  # e.g. K = 1, 2, 4, 8, 16 on a log axis, written as plain numbers
            ax.set_xticks(panel["xticks"], [f"{v:g}" for v in panel["xticks"]])
            ax.minorticks_off()
        if panel.get("ylim"):
            ax.set_ylim(*panel["ylim"])
        if panel.get("note"):
            ax.text(0.0, -0.22, panel["note"], transform=ax.transAxes, fontsize=8, va="top")
        ax.margins(x=0.08, y=0.08)  # room for the labels of the outermost points
        lo, hi = ax.get_xlim()      # and more on the right, where a label written right of its point ends
        ax.set_xlim(lo, hi * (hi / lo) ** 0.1 if ax.get_xscale() == "log" else hi + 0.1 * (hi - lo))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="gray")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def make_grid(images, nrow):
    """(N, C, H, W) in [-1, 1] -> uint8 PIL grid with `nrow` images per row and a 1-pixel gap."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    N, C, H, W = x.shape
    rows = (N + nrow - 1) // nrow
    grid = torch.full((C, rows * (H + 1) + 1, nrow * (W + 1) + 1), 255, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (H + 1): 1 + r * (H + 1) + H, 1 + c * (W + 1): 1 + c * (W + 1) + W] = x[i]
    from PIL import Image
    arr = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if C == 1 else arr)


def class_grid(images, labels, per_class=10, zoom=3):
    """PIL grid, one row per class (the first `per_class` images of each), enlarged `zoom` times."""
    rows = torch.cat([images[labels == k][:per_class] for k in range(int(labels.max()) + 1)])
    im = make_grid(rows, per_class)
    return im.resize((im.width * zoom, im.height * zoom), resample=0)


def save_class_grid(images, labels, path, per_class=10, zoom=3):
    class_grid(images, labels, per_class, zoom).save(path)


def save_titled_grids(panels, path, per_class=8, zoom=3):
    """One figure of class grids side by side, each under its title: panels = [(title, images, labels), ...]."""
    from PIL import Image, ImageDraw
    ims = [class_grid(x, y, per_class, zoom).convert("RGB") for _, x, y in panels]
    gap, top = 12, 22
    width = sum(im.width for im in ims) + gap * (len(ims) + 1)
    fig = Image.new("RGB", (width, max(im.height for im in ims) + top + gap), "white")
    draw, x = ImageDraw.Draw(fig), gap
    for (title, _, _), im in zip(panels, ims):
        draw.text((x, 6), title, fill="black")
        fig.paste(im, (x, top))
        x += im.width + gap
    fig.save(path)
