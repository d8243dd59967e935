"""Benchmark (a script, not a test): GuidedSeg's inference pipeline against a plain MONAI baseline.

Both start from the scan in memory and end with a label map on the scan's own grid, with the
same network, the same bundle preprocessing, the same windows (patch and stride) and Gaussian
blending. The baseline is what a careful user writes with MONAI directly: the whole preprocessed
volume through ``sliding_window_inference`` in float32 (one window per call, ``torch.no_grad``),
arg-max, nearest-neighbour back onto the scan's grid (the cheapest way back). The pipeline is
:class:`GuidedSegLib.inference.Predictor`. Each run is a fresh child process, so its peak
resident memory is its own; runs alternate baseline / pipeline, and the table gives medians.

    python Testing/benchmark_inference.py --work runs/bench-inference              # CPU
    python Testing/benchmark_inference.py --work runs/bench-inference --device cuda

The network is the paper's U-Net (widths 16-256, 14 classes, patch 64x160x160, stride
32x80x80, preprocessing preset ``guidednet-paper``) with seeded random weights: speed and memory
do not depend on the weights. Inputs: a phantom, and ../shared/data/ct-abdomen-sample's CT
resampled to 512x512x300 voxels.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CT = ROOT.parent / "shared" / "data" / "ct-abdomen-sample" / "imagesTs" / "totalseg_example_ct.nii.gz"


def make_bundle(folder: Path, widths: list[int]) -> Path:
    import torch

    from GuidedSegLib.bundle import write_bundle
    from GuidedSegLib.labels import FLARE22_LABELS, label_colour
    from GuidedSegLib.networks.unet import UNet3D
    from GuidedSegLib.preprocessing import PRESETS

    if folder.exists():
        return folder
    torch.manual_seed(0)
    network = UNet3D(1, 14, widths, 0.0, 4)
    labels = {0: "background", **FLARE22_LABELS}
    metadata = {"name": "benchmark-paper-unet", "method": "supervised", "network": network.config(),
                "labels": {str(v): n for v, n in labels.items()},
                "colours": {str(v): list(label_colour(n)) for v, n in labels.items() if v},
                "preprocessing": PRESETS["guidednet-paper"].to_dict(), "patch": [64, 160, 160],
                "stride": [32, 80, 80], "validation": None, "parent": None}
    return write_bundle(folder, {"A": network}, metadata)


def make_inputs(work: Path, size: tuple[int, int, int]) -> dict[str, Path]:
    from GuidedSegLib.phantoms import generate_phantom

    inputs = {}
    phantom = work / "phantom.nii.gz"
    if not phantom.exists():
        sitk.WriteImage(generate_phantom(0).image, str(phantom))
    inputs["phantom"] = phantom
    if CT.exists():
        large = work / f"ct-{'x'.join(map(str, size))}.nii.gz"
        if not large.exists():
            ct = sitk.ReadImage(str(CT))
            spacing = [sp * n / m for sp, n, m in zip(ct.GetSpacing(), ct.GetSize(), size)]
            origin = np.asarray(ct.GetOrigin()) + np.reshape(ct.GetDirection(), (3, 3)) @ (
                (np.asarray(spacing) - np.asarray(ct.GetSpacing())) / 2)  # same outer box
            resampled = sitk.Resample(ct, list(size), sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing,
                                      ct.GetDirection(), -1024.0, sitk.sitkInt16)
            sitk.WriteImage(resampled, str(large))
        inputs[f"ct-abdomen-sample {'x'.join(map(str, size))}"] = large
    else:
        print(f"{CT} not found: only the phantom is measured", file=sys.stderr)
    return inputs


# ----------------------------------------------------------------------------------------------
# one measured run (a child process)


def baseline(bundle: Path, image: sitk.Image, device: str) -> tuple[sitk.Image, float]:
    import torch
    from monai.inferers import sliding_window_inference

    from GuidedSegLib.inference import Predictor
    from GuidedSegLib.preprocessing import preprocess, restore_label

    predictor = Predictor(bundle, device, amp=False)  # the same network, windows and overlap
    network = predictor.networks[0]
    began = time.perf_counter()
    prepared = preprocess(image, predictor.plan)
    volume = torch.from_numpy(sitk.GetArrayFromImage(prepared.image))[None, None].to(predictor.device)
    with torch.no_grad():
        logits = sliding_window_inference(volume, predictor.patch, 1, lambda x: network(x)[0],
                                          overlap=predictor.overlap, mode="gaussian")
    label = sitk.GetImageFromArray(logits.argmax(1)[0].to(torch.uint8).cpu().numpy())
    label.CopyInformation(prepared.image)
    out = restore_label(label, prepared.source)
    return out, time.perf_counter() - began


def pipeline(bundle: Path, image: sitk.Image, device: str) -> tuple[sitk.Image, float]:
    from GuidedSegLib.inference import Predictor

    predictor = Predictor(bundle, device)
    began = time.perf_counter()
    out = predictor.segment(image)
    return out, time.perf_counter() - began


def child(args) -> None:
    import torch

    image = sitk.ReadImage(str(args.input))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    label, seconds = (baseline if args.child == "baseline" else pipeline)(args.bundle, image, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    sitk.WriteImage(label, str(args.save))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_mb": rss_before,
                      "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}))


def measure(kind: str, bundle: Path, source: Path, save: Path, device: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--bundle", str(bundle), "--input", str(source),
                           "--save", str(save), "--device", device], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-inference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), help="the large CT, voxels (x, y, z)")
    parser.add_argument("--widths", default="16,32,64,128,256")
    parser.add_argument("--only", help="measure only inputs whose name contains this")
    parser.add_argument("--child", choices=("baseline", "pipeline"), help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from GuidedSegLib.geometry import Grid
    from GuidedSegLib.inference import Predictor, body_box, count_windows
    from GuidedSegLib.preprocessing import preprocess

    args.work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(args.work / f"bundle-{args.widths.replace(',', '-')}", [int(w) for w in args.widths.split(",")])
    rows = []
    for name, source in make_inputs(args.work, tuple(args.size)).items():
        if args.only and args.only not in name:
            continue
        image = sitk.ReadImage(str(source))
        predictor = Predictor(bundle)
        volume = sitk.GetArrayFromImage(preprocess(image, predictor.plan).image)
        box = body_box(volume, predictor.patch)
        windows = (count_windows(volume.shape, predictor.patch, predictor.stride),
                   count_windows(volume[box].shape, predictor.patch, predictor.stride))
        runs = {"baseline": [], "pipeline": []}
        for repeat in range(args.repeats):
            for kind in ("baseline", "pipeline"):
                result = measure(kind, bundle, source, args.work / f"{kind}.nii.gz", args.device)
                runs[kind].append(result)
                print(f"{name} run {repeat + 1} {kind}: {result['seconds']:.2f} s, peak RSS "
                      f"{result['peak_rss_mb']:.0f} MB", flush=True)
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(args.work / "baseline.nii.gz")))
        b_image = sitk.ReadImage(str(args.work / "pipeline.nii.gz"))
        assert Grid.of(b_image).mismatch(Grid.of(image)) is None
        agreement = float((a == sitk.GetArrayFromImage(b_image)).mean())
        med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        rows.append({"input": name, "size": list(image.GetSize()), "preprocessed": list(volume.shape[::-1]),
                     "windows": windows, "baseline_s": med["baseline"], "pipeline_s": med["pipeline"],
                     "speed-up": med["baseline"] / med["pipeline"],
                     "baseline_peak_mb": max(r["peak_rss_mb"] for r in runs["baseline"]),
                     "pipeline_peak_mb": max(r["peak_rss_mb"] for r in runs["pipeline"]),
                     "rss_before_mb": runs["pipeline"][0]["rss_before_mb"],
                     "pipeline_gpu_mb": runs["pipeline"][0]["peak_gpu_mb"], "agreement": agreement,
                     "runs": runs})
    print()
    print(f"device {args.device}; network widths {args.widths}; {args.repeats} runs each, medians")
    print("| input | voxels (x, y, z) | preprocessed | windows baseline / pipeline | baseline s | pipeline s | "
          "speed-up | peak RSS baseline / pipeline (MB) | voxels agreeing |")
    print("|---|---|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['input']} | {r['size']} | {r['preprocessed']} | {r['windows'][0]} / {r['windows'][1]} | "
              f"{r['baseline_s']:.1f} | {r['pipeline_s']:.1f} | {r['speed-up']:.2f}x | "
              f"{r['baseline_peak_mb']:.0f} / {r['pipeline_peak_mb']:.0f} | {100 * r['agreement']:.2f}% |")
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
