"""Pictures of what snapshot clients send (``runtime.save_snapshots``) and the report's gallery page.

Layouts are checked through the ``Layout`` the renderer returns (where each outline and tile went) and
through pixels at those places, so the tests do not depend on the font.
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from osfed_hpc import report as rp
from osfed_hpc import snapshot_pictures as sp
from osfed_hpc.cli import main
from osfed_hpc.errors import RunError
from osfed_hpc.snapshot import MultiGrid, default_multiscale_leaves
from tests.test_report_compare import RUNS, write_run

PNG = b"\x89PNG\r\n\x1a\n"
MNIST = ((0.1307,), (0.3081,))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk (no decoder involved)."""
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def entry(client: int = 3, m: int = 1, channels: int = 1, size: int = 28, grid=None, seed: int = 0) -> sp.SnapshotEntry:
    gen = torch.Generator().manual_seed(seed)
    grid = MultiGrid(2) if grid is None else grid
    snapshots = torch.randn(m, channels, size, size, generator=gen)
    labels = torch.randn(m * grid.samples_per_snapshot, 10, generator=gen)
    return sp.snapshot_entry(client, snapshots, labels, grid)


# helpers ------------------------------------------------------------------------------------


def test_denormalise_inverts_the_loader_normalisation():
    pixels = np.array([0, 1, 37, 128, 254, 255], dtype=np.float32)
    for mean, std in (MNIST, ((0.5,), (0.5,))):
        normalised = (pixels / 255.0 - mean[0]) / std[0]
        back = sp.denormalise(normalised.reshape(1, 1, 6), (mean, std))  # [C=1, H=1, W=6] -> [1, 6, 1]
        assert back.dtype == np.uint8 and back.shape == (1, 6, 1)
        assert back[0, :, 0].tolist() == pixels.astype(int).tolist()
    # per-channel statistics, channels last in the result; out-of-range values clip to 0 / 255, NaN to 0
    x = torch.zeros(3, 2, 2)
    x[:, 0, 0] = torch.tensor([-100.0, 0.0, 100.0])
    x[0, 1, 1] = float("nan")
    out = sp.denormalise(x, IMAGENET)
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [0, round(0.456 * 255), 255]
    assert out[1, 1, 0] == 0
    assert out[0, 1].tolist() == [round(m * 255) for m in IMAGENET[0]]  # x = 0 is the mean pixel
    with pytest.raises(ValueError, match="2 values for 3-channel"):
        sp.denormalise(x, ((0.1, 0.2), (1.0,)))


def test_cell_boxes_follow_the_multigrid_sample_order():
    assert sp.cell_boxes(MultiGrid(2), 28, 28) == [(0, 0, 14, 14), (0, 14, 14, 14), (14, 0, 14, 14), (14, 14, 14, 14)]
    assert sp.cell_boxes(1, 28, 28) == [(0, 0, 28, 28)]
    leaves = default_multiscale_leaves(4)
    boxes = sp.cell_boxes(MultiGrid(4, leaves), 32, 32)
    assert len(boxes) == len(leaves) and sum(h * w for _, _, h, w in boxes) == 32 * 32
    assert boxes[0] == (0, 0, leaves[0][2] * 8, leaves[0][2] * 8)
    # the decoded sample i is cell i resized: check against the multi-grid function itself
    s = torch.arange(16.0).reshape(1, 1, 4, 4)
    decoded = MultiGrid(2)(s)
    for i, (y0, x0, h, w) in enumerate(sp.cell_boxes(MultiGrid(2), 4, 4)):
        assert decoded[i].mean() == pytest.approx(float(s[0, 0, y0:y0 + h, x0:x0 + w].mean()))
    with pytest.raises(ValueError, match="does not divide"):
        sp.cell_boxes(MultiGrid(3), 28, 28)


def test_top_classes_for_each_label_kind():
    y = torch.tensor([[0.5, -1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 1.0]])
    assert sp.top_classes(y, 2, "targets") == [[(2, 2.0), (3, 2.0)], [(3, 1.0), (0, 0.0)]]
    probs = sp.top_classes(y, 1, "logits")
    assert probs[1][0][0] == 3 and probs[1][0][1] == pytest.approx(np.e / (3 + np.e))
    assert sp.top_classes(torch.tensor([[0.1, 0.9]]), 5, "probabilities") == [[(1, pytest.approx(0.9)), (0, pytest.approx(0.1))]]
    assert sp.format_label(7, 1.4249, "targets") == "7: +1.42"
    assert sp.format_label(7, 0.413, "logits") == "7: 41%"
    assert sp.format_label(1, 0.5, "probabilities", ["cat", "dog"]) == "dog: 50%"
    with pytest.raises(ValueError, match="label_kind"):
        sp.top_classes(y, 1, "softmax")


def test_picture_path_and_schedule():
    assert sp.picture_path("RUN", 10) == Path("RUN/snapshots/round-000010.png")
    assert [r for r in range(1, 11) if sp.wants_picture(5, r)] == [5, 10]
    assert not any(sp.wants_picture(0, r) for r in range(1, 5))


# the picture --------------------------------------------------------------------------------


def test_round_picture_is_a_png_with_outlines_tiles_and_top_k_text(tmp_path):
    entries = [entry(3, seed=1), entry(7, m=2, seed=2)]
    path = sp.picture_path(tmp_path, 10)
    layout = sp.write_round_picture(path, 10, entries, MNIST, top_k=3, total_clients=5)
    width, height = png_size(path)
    # 28 px snapshots are shown at 168 px (x6), tiles at 84 px (x3): 3 snapshot rows, 4 tiles each
    assert 168 + 4 * 84 < width < 2000 and 3 * 168 < height < 2000
    # one outline and one decoded tile per cell: 1 snapshot x 4 cells + 2 snapshots x 4 cells
    assert len(layout.outlines) == len(layout.tiles) == 12
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (height, width, 3)
    for i, (x0, y0, x1, y1) in enumerate(layout.outlines):
        assert (x1 - x0 + 1, y1 - y0 + 1) == (84, 84)  # a 14-px cell at x6
        assert tuple(image[y0 + 40, x0]) == sp.PALETTE[i % 4]  # left edge, mid-height
        assert tuple(image[y1, x0 + 40]) == sp.PALETTE[i % 4]  # bottom edge
    for i, (x0, y0, x1, y1) in enumerate(layout.tiles):
        assert (x1 - x0 + 1, y1 - y0 + 1) == (84 + 4, 84 + 4)  # the frame around a 28-px tile at x3
        assert tuple(image[y0, x0 + 10]) == sp.PALETTE[i % 4]
    # the first tile's pixels are the de-normalised decoded cell, upscaled by nearest
    x0, y0, _, _ = layout.tiles[0]
    expected = sp.denormalise(entries[0].decoded[0], MNIST)[..., 0]
    assert np.array_equal(image[y0 + 2:y0 + 2 + 84:3, x0 + 2:x0 + 2 + 84:3, 0], expected)
    # text: the header says who is shown, every tile has its number and top-3 classes
    assert layout.texts[0] == "round 10: clients 3, 7 (2 of 5 shown)"
    tops = sp.top_classes(entries[0].labels, 3)
    first = layout.texts.index("#0")
    assert layout.texts[first + 1:first + 4] == [sp.format_label(c, v, "targets") for c, v in tops[0]]
    assert sum(t.startswith("#") for t in layout.texts) == 12


def test_colour_and_multiscale_pictures(tmp_path):
    grid = MultiGrid(8, default_multiscale_leaves(8))
    path = tmp_path / "ms.png"
    layout = sp.write_round_picture(path, 1, [entry(0, channels=3, size=64, grid=grid)], IMAGENET, top_k=2,
                                    label_kind="logits")
    assert len(layout.outlines) == len(grid.leaves) == 40
    width, height = png_size(path)
    assert width <= 3 * 64 + 3 * sp.GAP + sp.TILE_COLUMNS * (128 + 4 + 200) and height < 2000
    assert sum(t.endswith("%") for t in layout.texts) == 40 * 2
    with pytest.raises(ValueError, match="no snapshots"):
        sp.render_round(1, [], MNIST)


def test_entry_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="need 4 decoded"):
        sp.SnapshotEntry(1, torch.zeros(1, 1, 4, 4), sp.cell_boxes(2, 4, 4), torch.zeros(4, 1, 4, 4), torch.zeros(3, 10))


def test_round_pictures_collector_writes_every_n_rounds_and_caps_clients(tmp_path):
    pictures = sp.RoundPictures(every=2, run_dir=tmp_path, pixel_mean_std=MNIST, max_clients=2)
    gen = torch.Generator().manual_seed(0)
    written = []
    for round_ in (1, 2, 3, 4):
        pictures.begin(round_)
        for client in (0, 4, 9):
            pictures.add(client, torch.randn(1, 1, 28, 28, generator=gen), torch.randn(4, 10, generator=gen), MultiGrid(2))
        assert len(pictures.entries) == (2 if round_ % 2 == 0 else 0)
        written.append(pictures.finish())
    assert written == [None, sp.picture_path(tmp_path, 2), None, sp.picture_path(tmp_path, 4)]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["round-000002.png", "round-000004.png"]
    # no run directory (a worker, or a test environment): never active
    quiet = sp.RoundPictures(every=1, run_dir=None)
    quiet.begin(1)
    assert not quiet.active and quiet.finish() is None


def test_osfed_server_snippet_collects_what_it_decodes(tmp_path):
    """The lines the README tells OS-Fed's server to run, on a real OSFed instance and payload."""
    from osfed_hpc.algorithms.osfed import OSFed
    from osfed_hpc.payload import Payload
    from tests.test_osfed import make_env

    env = dataclasses.replace(make_env("cnn"), run_dir=tmp_path, save_snapshots=1, pixel_mean_std=MNIST)
    algo = OSFed(OSFed.Options(factor=2, num_snapshots=2, **{"outer_steps": 1}), env)
    pictures = sp.RoundPictures.from_env(env)
    gen = torch.Generator().manual_seed(0)
    algo.server_begin(1)
    pictures.begin(1)
    for client in (2, 5):
        snapshots = torch.randn(algo.snapshot_shape, generator=gen)
        labels = torch.randn(algo.labels_shape, generator=gen)
        payload = Payload(meta=algo.header(1, client), arrays={**algo._wire_arrays(snapshots, labels),
                                                                "scale": np.ones(1, np.float32)})
        algo.server_accumulate(client, payload, 1.0)
        # the snippet: after a successful decode, hand (S, Y) and the decoder's grid to the collector
        if pictures.active:
            pictures.add(client, *algo._decode_arrays(payload.arrays), algo._wire_grid(payload.arrays, server_side=True))
        assert torch.equal(pictures.entries[-1].snapshots, snapshots)
    algo.server_finish()
    path = pictures.finish()
    assert path == tmp_path / "snapshots" / "round-000001.png" and path.read_bytes()[:8] == PNG


# the gallery ----------------------------------------------------------------------------------


@pytest.fixture()
def gallery_runs(tmp_path) -> dict[str, Path]:
    """Two finished runs; osfed saved pictures at rounds 2 and 10, fedavg saved none."""
    runs = {name: write_run(tmp_path / "runs" / name, *RUNS[name]) for name in ("fedavg-best", "osfed")}
    for round_ in (10, 2):
        sp.write_round_picture(sp.picture_path(runs["osfed"], round_), round_, [entry(1, seed=round_)], MNIST)
    return runs


def test_gallery_lists_pictures_without_copying_them(gallery_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert rp.run_report([str(p) for p in gallery_runs.values()], str(out)) == 0
    text = (out / "gallery.md").read_text()
    assert "## osfed" in text and "fedavg-best" not in text
    assert text.index("round-000002") < text.index("round-000010")  # by round
    assert "`snapshots/round-000002.png`" in text  # relative to the run directory
    link = text.split("(<", 1)[1].split(">)", 1)[0]
    assert (out / link).resolve() == (gallery_runs["osfed"] / "snapshots" / "round-000002.png").resolve()
    assert "--include-snapshots" in text and "![" not in text
    assert not (out / "snapshots").exists() and not list(out.rglob("round-*.png"))
    assert "2 pictures listed, not copied" in capsys.readouterr().out


def test_gallery_copies_pictures_only_when_asked(gallery_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, gallery_runs.values()), "--out", str(out), "--include-snapshots"]) == 0
    copies = sorted(out.rglob("round-*.png"))
    assert [p.relative_to(out).as_posix() for p in copies] == ["snapshots/osfed/round-000002.png",
                                                              "snapshots/osfed/round-000010.png"]
    assert copies[0].read_bytes() == (gallery_runs["osfed"] / "snapshots" / "round-000002.png").read_bytes()
    text = (out / "gallery.md").read_text()
    assert "![osfed round-000002](<snapshots/osfed/round-000002.png>)" in text
    assert "2 pictures copied" in capsys.readouterr().out


def test_no_pictures_no_gallery_and_the_flag_needs_out(tmp_path, capsys):
    run = write_run(tmp_path / "runs" / "fedavg-best", *RUNS["fedavg-best"])
    out = tmp_path / "report"
    assert rp.run_report([str(run)], str(out), include_snapshots=True) == 0
    assert not (out / "gallery.md").exists() and (out / "report.md").exists()
    with pytest.raises(RunError, match="give --out"):
        rp.run_report([str(run)], None, include_snapshots=True)


def test_gallery_names_runs_of_the_same_name_apart(tmp_path, capsys):
    runs = []
    for sweep in ("a", "b"):
        run = write_run(tmp_path / sweep / "osfed", *RUNS["osfed"])
        sp.write_round_picture(sp.picture_path(run, 1), 1, [entry(0)], MNIST)
        runs.append({"run": "osfed", "algorithm": "osfed", "run_dir": str(run)})
    path = rp.write_gallery(tmp_path / "out", runs, include_snapshots=True)
    text = path.read_text()
    assert "snapshots/osfed/round-000001.png" in text and "snapshots/osfed-2/round-000001.png" in text


def test_a_failed_write_warns_instead_of_failing_the_round(tmp_path, capsys):
    blocker = tmp_path / "snapshots"
    blocker.write_text("a file where the folder should be")
    pictures = sp.RoundPictures(every=1, run_dir=tmp_path)
    pictures.begin(3)
    pictures.add(0, torch.zeros(1, 1, 4, 4), torch.zeros(4, 10), MultiGrid(2))
    assert pictures.finish() is None and not pictures.entries
    assert "could not write" in capsys.readouterr().err
