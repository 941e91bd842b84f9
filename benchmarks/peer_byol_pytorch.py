#!/usr/bin/env python
"""Peer benchmark: lucidrains' byol-pytorch on CIFAR-10 for a wall-clock budget, scored by kNN top-1.

Model and optimiser exactly as in the byol-pytorch README:
    BYOL(torchvision.models.resnet18(weights=None), image_size=32, hidden_layer="avgpool")
    torch.optim.Adam(learner.parameters(), lr=3e-4)
with the library's default heads and augmentation (its DEFAULT_AUG works on the whole batch tensor, so one
crop/jitter draw is shared by a batch, and it ends with an ImageNet-statistics Normalize). Inputs are float
NCHW in [0, 1], reshuffled every epoch, drop_last batches.

Budget: the clock starts at the top of main(), minus the random-init kNN, which is excluded. That random-init
kNN does exactly the work of the final evaluation, so its measured duration is the eval reserve: training stops
before elapsed + one more step would pass budget_seconds - eval_reserve.

kNN (InstDisc / solo-learn): 512-d avgpool features of the online ResNet-18 (eval mode, no augmentation, the
same ImageNet Normalize the augment applies), L2-normalised; k=200 cosine neighbours from the training set,
votes weighted by exp(sim / 0.1), argmax of per-class sums. Final lines:
    steps=<int> epochs=<float> train_seconds=<float> images_per_sec=<float>
    knn_top1_random_init=<pct>
    knn_top1=<pct>
    whole_seconds=<float>        (budget-counted wall clock: whole script minus the random-init kNN)
    versions: torch=... torchvision=... byol_pytorch=...
    torch threads=<n>
"""

import argparse
import random
import time
from importlib.metadata import version

import numpy as np
import torch
import torchvision
from byol_pytorch import BYOL
from torchvision import transforms as T


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="npz with x (N,32,32,3 uint8) and y (N,)")
    p.add_argument("--test", required=True, help="npz with x and y, the kNN queries")
    p.add_argument("--budget_seconds", type=float, default=1200)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="use a random N training images (smoke tests)")
    p.add_argument("--test_limit", type=int, default=None, help="use a random N test images (smoke tests)")
    p.add_argument("--eval_batch", type=int, default=512)
    p.add_argument("--knn_k", type=int, default=200)
    p.add_argument("--knn_t", type=float, default=0.1)
    p.add_argument("--time_steps", type=int, default=0, help="only time this many steps (after 5 untimed), then exit")
    return p.parse_args()


def time_steps(learner, opt, args):
    """Prints the median step's images_per_sec on the training data's first batch, like `benchmark.py --what=step`."""
    images = to_float(load(args.train, args.batch_size)[0])
    times = []
    for i in range(5 + args.time_steps):
        start = time.perf_counter()
        loss = learner(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
        if i >= 5:
            times.append(time.perf_counter() - start)
    print(f"images_per_sec={args.batch_size / sorted(times)[len(times) // 2]:.1f}")


def load(path, limit):
    d = np.load(path)
    x, y = d["x"], d["y"]
    if limit is not None:  # the arrays are sorted by class, so a smoke subset must be a random (seeded) sample
        keep = np.sort(np.random.default_rng(0).permutation(len(y))[:limit])
        x, y = x[keep], y[keep]
    # uint8 NCHW kept in memory; converted to float [0, 1] per batch
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y).long()


def to_float(x_u8):
    return x_u8.float().div_(255.0)


# the same Normalize that ends byol-pytorch's DEFAULT_AUG, so eval inputs match training inputs
NORMALIZE = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


@torch.no_grad()
def embed(learner, x_u8, batch):
    learner.eval()  # BatchNorm uses running statistics
    feats = []
    for i in range(0, len(x_u8), batch):
        x = NORMALIZE(to_float(x_u8[i : i + batch]))
        # the hooked avgpool output (512-d), i.e. the backbone with fc = Identity
        f = learner(x, return_embedding=True, return_projection=False)
        feats.append(torch.nn.functional.normalize(f, dim=1))
    learner.train()
    return torch.cat(feats)


@torch.no_grad()
def knn_top1(learner, train, test, args, chunk=500):
    bank, bank_y = embed(learner, train[0], args.eval_batch), train[1]
    queries, query_y = embed(learner, test[0], args.eval_batch), test[1]
    n_classes = int(max(bank_y.max(), query_y.max())) + 1
    k = min(args.knn_k, len(bank))
    correct = 0
    for i in range(0, len(queries), chunk):  # chunks bound the (chunk x bank) similarity matrix
        sim, idx = (queries[i : i + chunk] @ bank.T).topk(k, dim=1)
        weights = (sim / args.knn_t).exp()
        scores = torch.zeros(len(sim), n_classes).scatter_add_(1, bank_y[idx], weights)
        correct += (scores.argmax(1) == query_y[i : i + chunk]).sum().item()
    return 100.0 * correct / len(queries)


def main():
    t_start = time.monotonic()
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)  # byol-pytorch's RandomApply draws from Python's random

    learner = BYOL(torchvision.models.resnet18(weights=None), image_size=args.image_size, hidden_layer="avgpool")
    opt = torch.optim.Adam(learner.parameters(), lr=args.lr)
    if args.time_steps:
        return time_steps(learner, opt, args)
    train, test = load(args.train, args.limit), load(args.test, args.test_limit)
    n_train = len(train[0])
    if n_train < args.batch_size:
        raise SystemExit(f"{n_train} training images < batch_size {args.batch_size}")
    print(f"train={n_train} test={len(test[0])} batch_size={args.batch_size} budget_seconds={args.budget_seconds}")

    t_eval = time.monotonic()
    acc_random = knn_top1(learner, train, test, args)
    eval_reserve = time.monotonic() - t_eval  # same work as the final eval, so this is its measured cost
    print(f"random-init knn={acc_random:.2f}% eval_reserve={eval_reserve:.1f}s (not counted in the budget)", flush=True)

    def elapsed():
        return time.monotonic() - t_start - eval_reserve

    deadline = args.budget_seconds - eval_reserve
    steps, step_seconds, loss = 0, 0.0, float("nan")
    t_train = time.monotonic()
    next_report = t_train + 60
    while elapsed() + step_seconds < deadline:  # stop before one more step would eat into the eval reserve
        perm = torch.from_numpy(np.random.permutation(n_train))
        for i in range(0, n_train - args.batch_size + 1, args.batch_size):  # drop_last
            if elapsed() + step_seconds >= deadline:
                break
            t_step = time.monotonic()
            images = to_float(train[0][perm[i : i + args.batch_size]])
            loss = learner(images)
            opt.zero_grad()
            loss.backward()
            opt.step()
            learner.update_moving_average()
            steps += 1
            step_seconds = time.monotonic() - t_step
            if time.monotonic() >= next_report:
                next_report += 60
                secs = time.monotonic() - t_train
                print(
                    f"[{elapsed():7.1f}s] steps={steps} epochs={steps * args.batch_size / n_train:.2f} "
                    f"img/s={steps * args.batch_size / secs:.1f} loss={loss.item():.4f}",
                    flush=True,
                )
    train_seconds = time.monotonic() - t_train

    acc = knn_top1(learner, train, test, args)
    print(
        f"steps={steps} epochs={steps * args.batch_size / n_train:.3f} train_seconds={train_seconds:.1f} "
        f"images_per_sec={steps * args.batch_size / max(train_seconds, 1e-9):.2f}"
    )
    print(f"knn_top1_random_init={acc_random:.2f}")
    print(f"knn_top1={acc:.2f}")
    print(f"whole_seconds={elapsed():.1f}")
    print(
        f"versions: torch={torch.__version__} torchvision={torchvision.__version__} "
        f"byol_pytorch={version('byol-pytorch')}"
    )
    print(f"torch threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
