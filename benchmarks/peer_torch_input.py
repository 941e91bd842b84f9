#!/usr/bin/env python
"""Peer benchmark: the standard PyTorch + lightly BYOL input pipeline.

ImageFolder -> lightly BYOLTransform (BYOL paper defaults, only input_size set)
-> DataLoader(shuffle=True, drop_last=True, persistent_workers=True).

Runs --warmup batches untimed, then times --steps batches (re-creating the
iterator whenever an epoch ends) and prints:
    images_per_sec=<float>   (source images/s; each image counted once even
                              though it yields two views)
    versions: torch=... torchvision=... lightly=...
"""

import argparse
import time

import torch
import torchvision
from torch.utils.data import DataLoader

import lightly
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root (class subfolders)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="timed batches")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up batches")
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(1)

    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=args.image_size),
        view_2_transform=BYOLView2Transform(input_size=args.image_size),
    )
    dataset = torchvision.datasets.ImageFolder(args.data, transform=transform)
    if len(dataset) < args.batch_size:
        raise SystemExit(f"dataset has {len(dataset)} images < batch_size {args.batch_size}")

    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )

    it = iter(loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:  # epoch ended: start a new one
            it = iter(loader)
            return next(it)

    for _ in range(args.warmup):
        next_batch()

    images = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        views, labels = next_batch()
        images += labels.shape[0]  # source images, not views
    elapsed = time.perf_counter() - t0

    assert len(views) == 2 and views[0].shape[-1] == args.image_size
    print(f"images_per_sec={images / elapsed:.3f}")
    print(
        f"versions: torch={torch.__version__} torchvision={torchvision.__version__} "
        f"lightly={lightly.__version__} (images={images} steps={args.steps} "
        f"warmup={args.warmup} batch_size={args.batch_size} workers={args.workers} "
        f"image_size={args.image_size} elapsed_s={elapsed:.3f})"
    )


if __name__ == "__main__":
    main()
