"""The prepared GPU check (issue 11): OS-Fed factor 4 with ResNet-18-GN at 224/336/448 px, bf16 local
training and channels-last, 2 rounds each, per-client peak GPU memory and seconds next to the
paper's Table 10 (ImageNet-1K; 4.55 / 8.8 / 14.9 GB and 3.6 / 5.3 / 7.5 s per client).

A session lent a GPU for a few minutes runs ``benchmarks/gpu_check.sh``: everything it needs is
generated here (an ImageNet-layout folder of random-texture JPEGs, converted with ``osfed-hpc
prepare``), nothing is downloaded. What is compared: the paper's per-client memory and seconds are
for a client's snapshot round at that resolution; ours are the largest ``peak_memory_bytes`` of any
client (torch's CUDA peak, reset before each client) and the mean client seconds (local training of
``--local-steps`` steps of batch 64 plus snapshot synthesis), with synthesis seconds reported apart
because Table 10's client time is dominated by it. The local data are random textures, so accuracy
means nothing here; memory and time depend only on shapes.

    benchmarks/gpu_check.sh                  # on the GPU machine (~5 min including setup)
    python benchmarks/gpu_check.py --device cpu --resolutions 32 --clients 2 --local-steps 1 \
        --set algorithm.outer_steps=1 algorithm.lbfgs_max_iter=2          # CPU dry run (~2 min)

Writes ``benchmarks/results/gpu_check.json`` (``--out`` elsewhere) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import MPIRUN, ROOT, machine_info, table, write_result  # first: sets OMP_NUM_THREADS

PAPER_TABLE10 = {224: (4.55, 3.6), 336: (8.8, 5.3), 448: (14.9, 7.5)}  # GB, seconds per client


def make_folder(root: Path, classes: int, per_class: int, side: int, seed: int = 0) -> None:
    """ImageNet layout (train/ and val/<wnid>/*.JPEG) of smooth random textures, ``side`` px on the long side."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((side, side * 3 // 4), Image.BICUBIC)
                img.save(folder / f"img_{i:04d}.JPEG", quality=90)


def run(args: argparse.Namespace, data: Path, resolution: int, out: Path) -> dict:
    command = [MPIRUN, "-n", str(args.ranks), sys.executable, "-m", "osfed_hpc", "run", str(ROOT / "configs" / "imagenet1k.yaml"),
               f"data.path={data}", f"data.clients={args.clients}", "data.alpha=1.0", f"data.resolution={resolution}",
               "data.num_workers=4", "model.name=resnet18_gn", "rounds=2", "eval.every=2", "eval.batch_size=64",
               "algorithm=osfed", "algorithm.factor=4", f"train.local_steps={args.local_steps}", "train.batch_size=64",
               f"runtime.device={args.device}", f"runtime.amp={'bf16' if args.device == 'cuda' else 'none'}",
               "runtime.channels_last=true", f"out={out}", "name=gpu-check", *args.set]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"resolution": resolution, "error": result.stderr[-2000:], "wall_seconds": wall}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "phase_epoch" not in r]
    stats = [r["client_stats"] for r in records]
    peak = max(max(s["peak_memory_bytes"]) for s in stats)
    seconds = [v for s in stats for v in s["seconds"]]
    synth = [v for s in stats for v in s.get("synth_seconds", [])]
    paper_gb, paper_s = PAPER_TABLE10.get(resolution, (None, None))
    return {"resolution": resolution, "client_peak_gb": peak / 1e9, "paper_gb": paper_gb,
            "client_seconds_mean": float(np.mean(seconds)), "synthesis_seconds_mean": float(np.mean(synth)) if synth else None,
            "paper_seconds": paper_s, "uplink_bytes_per_client_round": records[-1]["uplink_bytes"] / len(records[-1]["clients"]),
            "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 336, 448])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks: rank 0 serves, the others host clients")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more config overrides, e.g. algorithm.outer_steps=1 for a CPU dry run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="osfed-gpu-check-") as tmp:
        tmp_path = Path(tmp)
        make_folder(tmp_path / "folder", classes=10, per_class=8 * args.clients, side=max(args.resolutions) + 64)
        data = tmp_path / "h5"
        subprocess.run([sys.executable, "-m", "osfed_hpc", "prepare", "--source", "imagefolder", "--root",
                        str(tmp_path / "folder"), "--out", str(data), "--max-side", str(max(args.resolutions) + 64), "--quiet"],
                       check=True, capture_output=True)
        for resolution in args.resolutions:
            row = run(args, data, resolution, tmp_path / f"run-{resolution}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    headers = ["resolution", "client_peak_gb", "paper_gb", "client_seconds_mean", "synthesis_seconds_mean",
               "paper_seconds", "uplink_bytes_per_client_round"]
    print(table(headers, [[row.get(h, "error") if row.get(h) is not None else "-" for h in headers] for row in rows]))
    write_result("gpu_check", {"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}, "rows": rows,
                               "quick": args.device == "cpu"}, args.out)


if __name__ == "__main__":
    main()
