"""Pictures of what snapshot clients send (``runtime.save_snapshots: N``).

Every N rounds rank 0 writes ``RUN/snapshots/round-000010.png``: one block per selected client (the
first ``max_clients`` in client-id order) with each snapshot de-normalised to pixels, the multi-grid
cells outlined and numbered, and beside it the decoded cells, i.e. the samples ``F(S)`` that the model
actually sees, each under its top-k label classes. A cell's outline and its decoded tile share a colour.

Why pictures: a snapshot is the whole uplink of OS-Fed / 3SFC, and looking at it is the quickest way to
see whether the synthesis produced structure, noise or saturated blobs, and which classes each cell
pushes the model towards.

Why the pixels stay in the run directory: a snapshot is optimised so that its gradient matches a
client's update, and updates leak training data (gradient inversion), so a snapshot is derived from
client data. Only rank 0 writes, only into its own run directory; ``osfed-hpc report --out`` copies the
pictures elsewhere only with ``--include-snapshots``.

Labels. OS-Fed and 3SFC send free labels Y (one real K-vector per decoded sample, N(0, 1) initialised,
not normalised: methods.md 1.4.3); the loss ``-sum_c y_c log softmax(z)_c`` pulls the model towards
classes with large positive y_c. ``label_kind="targets"`` (the default, for them) ranks classes by y_c
and prints the raw value; ``"logits"`` prints softmax probabilities, ``"probabilities"`` the values as
percentages, for methods whose labels are one of those.

Rendering uses Pillow only (a core dependency), nearest-neighbour upscaling so that 28-px images stay
readable and every pixel of the code is visible; no matplotlib, no torch needed to read the PNG.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path

#: (y0, x0, h, w) of one multi-grid cell, in snapshot pixels
Box = tuple[int, int, int, int]

LABEL_KINDS = ("targets", "logits", "probabilities")
#: the folder of a run directory the pictures go to
SNAPSHOT_FOLDER = "snapshots"
#: displayed snapshot side: small images are upscaled (nearest) by an integer to at least this...
SNAPSHOT_MIN_SIDE = 168
#: ...and large ones shrunk to at most this
SNAPSHOT_MAX_SIDE = 448
#: displayed decoded cell side, likewise
TILE_MIN_SIDE = 84
TILE_MAX_SIDE = 128
#: decoded tiles per row beside a snapshot (a 40-leaf multi-scale layout wraps into 5 rows)
TILE_COLUMNS = 8
#: outline colours, cycled over the cells of a snapshot (distinct on grey and colour images)
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
GAP = 8
FONT_SIZE = 11


# ---------------------------------------------------------------------------------------------
# pure helpers


def picture_path(run_dir: str | Path, round: int) -> Path:
    """``RUN/snapshots/round-000010.png``: zero-padded so that a listing sorts by round."""
    return Path(run_dir) / SNAPSHOT_FOLDER / f"round-{round:06d}.png"


def wants_picture(save_snapshots: int, round: int) -> bool:
    """True on rounds N, 2N, ... for ``runtime.save_snapshots: N`` (0 = never)."""
    return save_snapshots > 0 and round % save_snapshots == 0


def cell_boxes(grid: Any, height: int, width: int) -> list[Box]:
    """The cells of one snapshot, in the order the multi-grid function emits their decoded samples.

    ``grid`` is anything with ``factor`` and ``leaves`` (``snapshot.MultiGrid``, the FSRCNN grid, or an
    int for the uniform grid): uniform = ``factor x factor`` equal cells row-major, multi-scale = the
    leaves (row, col, size) in units of ``H / factor`` px, in leaf order.
    """
    factor = int(grid) if isinstance(grid, int) else int(grid.factor)
    leaves = None if isinstance(grid, int) else getattr(grid, "leaves", None)
    if factor < 1 or height % factor or width % factor:
        raise ValueError(f"multi-grid factor {factor} does not divide the snapshot resolution {height}x{width}")
    uh, uw = height // factor, width // factor
    if leaves is None:
        return [(i * uh, j * uw, uh, uw) for i in range(factor) for j in range(factor)]
    return [(r * uh, c * uw, s * uh, s * uw) for r, c, s in leaves]


def denormalise(images: torch.Tensor | np.ndarray, pixel_mean_std: tuple[Sequence[float], Sequence[float]]) -> np.ndarray:
    """Model inputs [..., C, H, W] -> uint8 pixels [..., H, W, C]: ``(x * std + mean) * 255``, rounded, clipped.

    The inverse of the loader's ``(pixel / 255 - mean) / std``. Snapshots are unconstrained, so values
    outside the pixel range are clipped to 0 / 255 (shown as saturated, not rescaled: what you see is
    what a natural image with those pixels would look like). ``mean``/``std`` have one value per channel
    or a single value for all.
    """
    x = images.detach().to("cpu", torch.float32).numpy() if torch.is_tensor(images) else np.asarray(images, np.float32)
    if x.ndim < 3:
        raise ValueError(f"expected images [..., C, H, W], got shape {list(x.shape)}")
    channels = x.shape[-3]
    mean, std = (np.asarray(v, dtype=np.float32).reshape(-1) for v in pixel_mean_std)
    for name, values in (("mean", mean), ("std", std)):
        if values.size not in (1, channels):
            raise ValueError(f"pixel_mean_std {name} has {values.size} values for {channels}-channel images")
    pixels = (x * std.reshape(-1, 1, 1) + mean.reshape(-1, 1, 1)) * 255.0
    pixels = np.clip(np.rint(np.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(np.uint8)
    return np.moveaxis(pixels, -3, -1)


def top_classes(labels: torch.Tensor | np.ndarray, k: int, kind: str = "targets") -> list[list[tuple[int, float]]]:
    """Per row of ``labels`` [N, K], the top-``k`` (class, value) pairs, largest first.

    ``targets``: raw values (free labels); ``logits``: softmax probabilities; ``probabilities``: as given.
    Ties keep the lower class first (stable), so the text is reproducible.
    """
    if kind not in LABEL_KINDS:
        raise ValueError(f"label_kind must be one of {', '.join(LABEL_KINDS)}, got {kind!r}")
    y = labels.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(labels) else np.asarray(labels, np.float64)
    if y.ndim != 2:
        raise ValueError(f"expected labels [N, K], got shape {list(y.shape)}")
    if kind == "logits":
        z = y - y.max(axis=1, keepdims=True)
        y = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = max(0, min(int(k), y.shape[1]))
    order = np.argsort(-y, axis=1, kind="stable")[:, :k]
    return [[(int(c), float(row[c])) for c in top] for row, top in zip(y, order)]


def format_label(cls: int, value: float, kind: str, class_names: Sequence[str] | None = None) -> str:
    """``"7: +1.42"`` for raw targets, ``"7: 41%"`` for probabilities (named when names are given)."""
    name = class_names[cls] if class_names is not None and cls < len(class_names) else str(cls)
    if kind == "targets":
        return f"{name}: {value:+.2f}"
    return f"{name}: {100.0 * value:.0f}%"


# ---------------------------------------------------------------------------------------------
# what one client sent


@dataclass
class SnapshotEntry:
    """One client's snapshot as the picture needs it, already on the CPU (the server's buffers are reused).

    ``snapshots`` [M, C, H, W] and ``decoded`` [M * L, C, H', W'] are model inputs (normalised);
    ``boxes`` are the L cells of one snapshot (the same layout for every snapshot); ``labels`` [M * L, K]
    are what the client sent (see ``label_kind`` in ``write_round_picture``).
    """

    client_id: int
    snapshots: torch.Tensor
    boxes: list[Box]
    decoded: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.snapshots.dim() == 3:
            self.snapshots = self.snapshots.unsqueeze(0)
        m, cells = self.snapshots.shape[0], len(self.boxes)
        if self.snapshots.dim() != 4 or self.decoded.dim() != 4:
            raise ValueError(f"client {self.client_id}: snapshots and decoded cells must be [N, C, H, W]")
        if self.decoded.shape[0] != m * cells or self.labels.shape[0] != m * cells:
            raise ValueError(f"client {self.client_id}: {m} snapshot(s) x {cells} cells need {m * cells} decoded "
                             f"samples and label rows, got {self.decoded.shape[0]} and {self.labels.shape[0]}")


def snapshot_entry(client_id: int, snapshots: torch.Tensor, labels: torch.Tensor, grid: Any) -> SnapshotEntry:
    """Build an entry from what the server holds at decode time: S [M, C, H, W], Y [M * L, K] and the
    multi-grid function ``grid`` (``MultiGrid`` or the FSRCNN grid), which it applies to get ``F(S)``.

    Runs without gradients and copies everything to the CPU, so the caller's tensors (views of the
    receive buffer) may be reused right after.
    """
    if snapshots.dim() == 3:
        snapshots = snapshots.unsqueeze(0)
    with torch.no_grad():
        decoded = grid(snapshots) if callable(grid) else _uniform(snapshots, int(grid))
    height, width = snapshots.shape[-2:]
    return SnapshotEntry(
        client_id=int(client_id),
        snapshots=snapshots.detach().to("cpu", torch.float32).clone(),
        boxes=cell_boxes(grid, int(height), int(width)),
        decoded=decoded.detach().to("cpu", torch.float32).clone(),
        labels=labels.detach().to("cpu", torch.float32).clone(),
    )


def _uniform(snapshots: torch.Tensor, factor: int) -> torch.Tensor:
    from .snapshot import multigrid_uniform

    return multigrid_uniform(snapshots, factor)


# ---------------------------------------------------------------------------------------------
# rendering


@dataclass
class Layout:
    """Where things were drawn (picture pixels), for tests and for anyone annotating further."""

    #: (x0, y0, x1, y1) of each cell outline, inclusive, in drawing order (client, snapshot, cell)
    outlines: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: (x0, y0, x1, y1) of each decoded tile's frame, same order
    tiles: list[tuple[int, int, int, int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _display_scale(side: int, low: int, high: int) -> float:
    """An integer upscale (nearest keeps pixels crisp) for small images, a shrink for large ones."""
    if side < low:
        return float(math.ceil(low / side))
    if side > high:
        return high / side
    return 1.0


def _to_image(pixels: np.ndarray, scale: float) -> Image.Image:
    """uint8 [H, W, C] -> an RGB image scaled by ``scale`` (nearest up, box-filtered down)."""
    channels = pixels.shape[-1]
    if channels == 3:
        image = Image.fromarray(pixels, "RGB")
    else:  # 1 channel (or an unusual count: show the first channel) as grey
        image = Image.fromarray(pixels[..., 0], "L").convert("RGB")
    if scale != 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.NEAREST if scale > 1 else Image.BOX)
    return image


def _text_height(font: ImageFont.ImageFont) -> int:
    box = font.getbbox("Ag0:%+")
    return int(box[3] - box[1]) + 3


def render_round(
    round: int,
    entries: Sequence[SnapshotEntry],
    pixel_mean_std: tuple[Sequence[float], Sequence[float]],
    top_k: int = 3,
    label_kind: str = "targets",
    class_names: Sequence[str] | None = None,
    total_clients: int | None = None,
) -> tuple[Image.Image, Layout]:
    """The picture of one round (see the module docstring) and where its parts are."""
    if not entries:
        raise ValueError("no snapshots to draw")
    font = _font()
    line = _text_height(font)
    layout = Layout()
    blocks = [_client_block(entry, pixel_mean_std, top_k, label_kind, class_names, font, line, layout.texts)
              for entry in entries]
    shown = ", ".join(str(e.client_id) for e in entries)
    total = len(entries) if total_clients is None else total_clients
    title = f"round {round}: client{'s' if len(entries) > 1 else ''} {shown}"
    if total > len(entries):
        title += f" ({len(entries)} of {total} shown)"
    legend = {"targets": f"top-{top_k} free-label values y_c (raw cross-entropy targets, unnormalised)",
              "logits": f"top-{top_k} classes, softmax of the labels", "probabilities": f"top-{top_k} label probabilities"}
    header = [title, f"left: snapshot (de-normalised, cells outlined); right: decoded cells F(S), {legend[label_kind]}"]
    layout.texts[:0] = header
    width = max(max(block.width for block, _, _ in blocks), max(int(font.getlength(t)) for t in header)) + 2 * GAP
    height = GAP + len(header) * line + GAP + sum(block.height + GAP for block, _, _ in blocks)
    picture = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    y = GAP
    for text in header:
        draw.text((GAP, y), text, fill=TEXT, font=font)
        y += line
    y += GAP
    for block, outlines, tiles in blocks:
        picture.paste(block, (GAP, y))
        layout.outlines.extend(_offset(outlines, GAP, y))
        layout.tiles.extend(_offset(tiles, GAP, y))
        y += block.height + GAP
    return picture, layout


Rect = tuple[int, int, int, int]


def _offset(rects: list[Rect], dx: int, dy: int) -> list[Rect]:
    return [(x0 + dx, y0 + dy, x1 + dx, y1 + dy) for x0, y0, x1, y1 in rects]


def _client_block(entry: SnapshotEntry, pixel_mean_std, top_k: int, label_kind: str, class_names, font,
                  line: int, texts: list[str]) -> tuple[Image.Image, list[Rect], list[Rect]]:
    """One client: a caption, then per snapshot a row [snapshot with outlines | decoded tiles with labels].
    Returns the block and its cell outlines and tiles in block coordinates."""
    snapshots = denormalise(entry.snapshots, pixel_mean_std)
    decoded = denormalise(entry.decoded, pixel_mean_std)
    tops = top_classes(entry.labels, top_k, label_kind)
    s_scale = _display_scale(max(snapshots.shape[1:3]), SNAPSHOT_MIN_SIDE, SNAPSHOT_MAX_SIDE)
    t_scale = _display_scale(max(decoded.shape[1:3]), TILE_MIN_SIDE, TILE_MAX_SIDE)
    caption = f"client {entry.client_id}" + (f", {snapshots.shape[0]} snapshots" if snapshots.shape[0] > 1 else "")
    texts.append(caption)
    cells = len(entry.boxes)
    rows = [_snapshot_row(entry.boxes, snapshots[m], decoded[m * cells:(m + 1) * cells], tops[m * cells:(m + 1) * cells],
                          s_scale, t_scale, label_kind, class_names, font, line, texts)
            for m in range(snapshots.shape[0])]
    block_w = max(max(img.width for img, _, _ in rows), int(font.getlength(caption)))
    block_h = line + sum(img.height + GAP for img, _, _ in rows) - GAP
    block = Image.new("RGB", (block_w, block_h), BACKGROUND)
    ImageDraw.Draw(block).text((0, 0), caption, fill=TEXT, font=font)
    all_outlines: list[Rect] = []
    all_tiles: list[Rect] = []
    y = line
    for img, outlines, tiles in rows:
        block.paste(img, (0, y))
        all_outlines.extend(_offset(outlines, 0, y))
        all_tiles.extend(_offset(tiles, 0, y))
        y += img.height + GAP
    return block, all_outlines, all_tiles


def _snapshot_row(boxes: list[Box], pixels: np.ndarray, decoded: np.ndarray, tops: list[list[tuple[int, float]]],
                  s_scale: float, t_scale: float, label_kind: str, class_names, font, line: int,
                  texts: list[str]) -> tuple[Image.Image, list[Rect], list[Rect]]:
    """[one snapshot with its cells outlined and numbered | its decoded cells, TILE_COLUMNS per row]."""
    snap = _to_image(pixels, s_scale)
    draw = ImageDraw.Draw(snap)
    outlines: list[Rect] = []
    for i, (y0, x0, h, w) in enumerate(boxes):
        colour = PALETTE[i % len(PALETTE)]
        rect = (round(x0 * s_scale), round(y0 * s_scale), round((x0 + w) * s_scale) - 1, round((y0 + h) * s_scale) - 1)
        draw.rectangle(rect, outline=colour, width=1 if min(h, w) * s_scale < 12 else 2)
        if min(h, w) * s_scale >= 20:  # a number on a white tab; smaller cells go by colour and position
            tab = draw.textbbox((rect[0] + 3, rect[1] + 2), str(i), font=font)
            draw.rectangle((tab[0] - 1, tab[1] - 1, tab[2] + 1, tab[3] + 1), fill=BACKGROUND)
            draw.text((rect[0] + 3, rect[1] + 2), str(i), fill=TEXT, font=font)
        outlines.append(rect)
    first = _to_image(decoded[0], t_scale)
    tile_w, tile_h = first.width + 4, first.height + 4  # a 2-px frame in the cell's colour
    text_h = (1 + len(tops[0])) * line
    widths = [int(font.getlength(format_label(c, v, label_kind, class_names))) for top in tops for c, v in top]
    cell_w = max(tile_w, max(widths, default=0)) + GAP
    cell_h = tile_h + text_h + GAP
    cols = min(TILE_COLUMNS, len(boxes))
    grid_x = snap.width + 2 * GAP
    row = Image.new("RGB", (grid_x + cols * cell_w, max(snap.height, math.ceil(len(boxes) / cols) * cell_h)), BACKGROUND)
    row.paste(snap, (0, 0))
    draw = ImageDraw.Draw(row)
    tiles: list[Rect] = []
    for i in range(len(boxes)):
        x, y = grid_x + (i % cols) * cell_w, (i // cols) * cell_h
        draw.rectangle((x, y, x + tile_w - 1, y + tile_h - 1), fill=PALETTE[i % len(PALETTE)])
        row.paste(_to_image(decoded[i], t_scale), (x + 2, y + 2))
        tiles.append((x, y, x + tile_w - 1, y + tile_h - 1))
        lines = [f"#{i}"] + [format_label(c, v, label_kind, class_names) for c, v in tops[i]]
        for j, text in enumerate(lines):
            draw.text((x, y + tile_h + 1 + j * line), text, fill=TEXT, font=font)
        texts.extend(lines)
    return row, outlines, tiles


def write_round_picture(
    path: str | Path,
    round: int,
    entries: Sequence[SnapshotEntry],
    pixel_mean_std: tuple[Sequence[float], Sequence[float]],
    top_k: int = 3,
    label_kind: str = "targets",
    class_names: Sequence[str] | None = None,
    total_clients: int | None = None,
) -> Layout:
    """Render the round and write it as PNG, atomically (a reader never sees half a picture)."""
    picture, layout = render_round(round, entries, pixel_mean_std, top_k, label_kind, class_names, total_clients)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        picture.save(temp, format="PNG")  # optimize=True: 8x the time for ~1% smaller
    return layout


# ---------------------------------------------------------------------------------------------
# the server-side collector


class RoundPictures:
    """Collects the entries of one round on rank 0 and writes the picture at the end of the fold.

    A method calls ``begin(round)`` in ``server_begin``, ``add(...)`` after decoding each payload (only
    when ``active``: it costs one multi-grid pass and a CPU copy) and ``finish()`` in ``server_finish``.
    At most ``max_clients`` clients (the first in fold order, i.e. client-id order) are drawn, so a
    60-client round of 224-px multi-scale snapshots holds a few MB, not hundreds.
    """

    def __init__(self, every: int, run_dir: str | Path | None,
                 pixel_mean_std: tuple[Sequence[float], Sequence[float]] = ((0.0,), (1.0,)),
                 max_clients: int = 8, top_k: int = 3, label_kind: str = "targets") -> None:
        if label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {', '.join(LABEL_KINDS)}, got {label_kind!r}")
        self.every = int(every)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.pixel_mean_std = pixel_mean_std
        self.max_clients = max_clients
        self.top_k = top_k
        self.label_kind = label_kind
        self.round = 0
        self.active = False
        self.entries: list[SnapshotEntry] = []
        self.seen = 0

    @classmethod
    def from_env(cls, env: Any, **kwargs: Any) -> RoundPictures:
        """From an ``Environment``: ``save_snapshots``, ``run_dir`` and ``pixel_mean_std``."""
        return cls(getattr(env, "save_snapshots", 0), getattr(env, "run_dir", None),
                   getattr(env, "pixel_mean_std", ((0.0,), (1.0,))), **kwargs)

    def begin(self, round: int) -> None:
        self.round = round
        self.active = self.run_dir is not None and wants_picture(self.every, round)
        self.entries = []
        self.seen = 0

    def add(self, client_id: int, snapshots: torch.Tensor, labels: torch.Tensor, grid: Any) -> None:
        """One accepted payload's (S, Y) and the multi-grid function it was decoded with."""
        if not self.active:
            return
        self.seen += 1
        if len(self.entries) < self.max_clients:
            self.entries.append(snapshot_entry(client_id, snapshots, labels, grid))

    def finish(self) -> Path | None:
        """Write ``RUN/snapshots/round-NNNNNN.png`` (nothing when inactive or no payload was accepted).
        A write error (disk full, permissions) is a warning on stderr, not a failed round."""
        if not self.active or not self.entries:
            self.entries = []
            return None
        path = picture_path(self.run_dir, self.round)
        try:
            write_round_picture(path, self.round, self.entries, self.pixel_mean_std, self.top_k, self.label_kind,
                                total_clients=self.seen)
        except OSError as exc:  # a full disk must not end a long run over a diagnostic picture
            print(f"[osfed-hpc] warning: round {self.round}: could not write {path}: {exc}", file=sys.stderr, flush=True)
            path = None
        finally:
            self.entries = []
            self.active = False
        return path
