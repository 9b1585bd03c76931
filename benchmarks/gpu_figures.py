"""The Python parts of benchmarks/gpu_figures.sh that no other benchmark script measures.

    python benchmarks/gpu_figures.py mfu --models ViT-B-32:256 ViT-B-16:256 ViT-L-14:128
    python benchmarks/gpu_figures.py decode --side 500 --batch 256

mfu: for each MODEL:BATCH, the FLOPs of one training step (backbone forward + backward in bf16
autocast, the prototype layer over 125,000 rows with r1 = 0.1) are counted with
torch.utils.flop_counter, and the step is timed as benchmarks/bench_train_step.py times it (its
`step` mode, median of rounds). MFU = FLOPs per step / step time / the GPU's dense bf16 peak
(--peak-tflops, or known from the device name). The optimizer's FLOPs are not counted.

decode: images/s of JPEG batches decoded and preprocessed (ViT-B-32's Resize 224 + CenterCrop +
Normalize) on the GPU (`unicom_ds.decode.decode_batch` + `TensorPreprocess`), against one CPU
core's PIL path with draft decoding (`open_for` + the PIL preprocess), on the scikit-image photos
re-encoded at --side (JPEG q90); and the difference of the two outputs.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import bench_train_step
from unicom_ds import backbone
from unicom_ds.prototypes import ShardedPrototypes

# Dense (not sparse) bf16 tensor-core peaks from the vendor's data sheets, TFLOP/s.
PEAKS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def step_flops(model_name: str, batch: int, classes: int, device: torch.device) -> int:
    model = backbone.build(model_name).to(device)
    layer = ShardedPrototypes(classes, backbone.embed_dim(model_name), r1=0.1).to(device)
    size = backbone.image_size(model_name)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            emb = model(images)
        layer(emb.float(), labels).backward()
    return counter.get_total_flops()


def mfu(a) -> None:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = a.peak_tflops or peak_tflops(name)
    if peak is None:
        raise SystemExit(f"unknown dense bf16 peak for {name!r}: pass --peak-tflops")
    for spec in a.models:
        model_name, batch = spec.split(":")
        flops = step_flops(model_name, int(batch), a.classes, device)
        torch.cuda.empty_cache()
        summary = bench_train_step.main(["--device", "cuda", "--model", model_name, "--batch", batch,
                                         "--classes", str(a.classes), "--bf16", "--steps", "10", "--warmup", "3",
                                         "--rounds", "2"])
        seconds = summary["ms"]["step"] / 1e3
        print(json.dumps({"model": model_name, "gpu": name, "batch": int(batch), "tflop_per_step": round(flops / 1e12, 3),
                          "step_ms": summary["ms"]["step"], "images_per_s": summary["images_per_s"],
                          "achieved_tflops": round(flops / seconds / 1e12, 1), "peak_tflops": peak,
                          "mfu": round(flops / seconds / 1e12 / peak, 4)}), flush=True)
        torch.cuda.empty_cache()


def decode(a) -> None:
    import open_clip

    from bench_decode import photo_jpegs
    from unicom_ds.decode import TensorPreprocess, decode_batch, needed_size, open_for

    torch.set_num_threads(1)
    _, _, pre = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    tensor_pre, need = TensorPreprocess(pre), needed_size(pre)
    photos = photo_jpegs(a.side)
    datas = (photos * (a.batch // len(photos) + 1))[: a.batch]

    def gpu() -> torch.Tensor:
        images, _ = decode_batch(datas, a.device)
        return torch.stack([tensor_pre(i) for i in images])

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    gpu()  # nvJPEG handles, kernels
    sync()
    start = time.perf_counter()
    for _ in range(a.repeat):
        out = gpu()
    sync()
    gpu_ips = a.repeat * a.batch / (time.perf_counter() - start)
    start = time.perf_counter()
    ref = torch.stack([pre(open_for(d, need)) for d in datas[: len(photos)]])
    cpu_ips = len(photos) / (time.perf_counter() - start)
    full = torch.stack([pre(open_for(d, None)) for d in datas[: len(photos)]])
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    diff = ((out[: len(photos)].cpu() - full) * std * 255).abs()
    print(json.dumps({"decode": a.device, "side": a.side, "batch": a.batch, "gpu_images_per_s": round(gpu_ips, 1),
                      "cpu_core_draft_images_per_s": round(cpu_ips, 1),
                      "gpu_vs_cpu_full_decode_px_mean": round(float(diff.mean()), 3),
                      "gpu_vs_cpu_full_decode_px_p99": round(float(diff.flatten().quantile(0.99)), 2),
                      "draft_vs_full_px_mean": round(float(((ref - full) * std * 255).abs().mean()), 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mfu")
    m.add_argument("--models", nargs="+", default=["ViT-B-32:256", "ViT-B-16:256", "ViT-L-14:128"])
    m.add_argument("--classes", type=int, default=125000)
    m.add_argument("--peak-tflops", type=float, default=None)
    d = sub.add_parser("decode")
    d.add_argument("--side", type=int, default=500)
    d.add_argument("--batch", type=int, default=256)
    d.add_argument("--repeat", type=int, default=5)
    d.add_argument("--device", default="cuda", help="cpu: the same batch path on the CPU, to check the script")
    a = ap.parse_args()
    {"mfu": mfu, "decode": decode}[a.what](a)


if __name__ == "__main__":
    main()
