"""Train a BiFormer detector or segmentor on the built-in Fashion-MNIST scenes for a fixed CPU time budget.

A plain loop (timm's AdamW, linear warm-up then cosine decay over the time budget, one evaluation at the
end) that measures what the "Detection and segmentation" figures of benchmarks/RESULTS.md state:

    python benchmarks/dense_train.py --task segmentation --architecture semantic_fpn --head-channels 64 --lr 2e-3
    python benchmarks/dense_train.py --task detection --architecture maskrcnn

(benchmarks/RESULTS.md lists every run with its exact command and the machine's load). One thread per run by default:
on the shared 2-core machine the 1-thread shallow runs made 6-10x more steps than the earlier 2-thread micro
runs (smaller model, one thread and less load from other jobs together; their shares were not separated).

Scenes are composed once before training (their composition time is printed, not counted in the budget).
Validation scenes use Fashion-MNIST's test crops, disjoint from the training crops. Needs the Debian package
``dataset-fashion-mnist`` and ``pip install -e ".[dense]"``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

from biformer.dense.tasks import PRESETS, CachedDataset, DetectionTask, SegmentationTask, cpu_model_options


def build_task(args: argparse.Namespace) -> DetectionTask | SegmentationTask:
    variant = PRESETS.get(args.variant, args.variant)
    backbone_options = dict(n_win=args.n_win, batch_norm="train", drop_path_rate=0.0)
    common = dict(train_scenes=args.train_scenes, val_scenes=args.val_scenes, image_size=args.image_size,
                  seed=args.seed, architecture=args.architecture, variant=variant)
    # The small CPU recipe (biformer train --task ... uses the same): narrow heads, few sampled RoIs.
    head_channels = args.head_channels if args.task == "segmentation" else None
    options = cpu_model_options(args.task, args.architecture, head_channels, backbone_options)
    task_class = SegmentationTask if args.task == "segmentation" else DetectionTask
    return task_class.scenes(**common, model_options=options)


def learning_rate(base: float, progress: float, warmup: float = 0.03) -> float:
    """Linear warm-up over the first ``warmup`` of the budget, then cosine decay to 1% (progress in [0, 1])."""
    if progress < warmup:
        return base * max(progress / warmup, 0.01)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup))))


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("segmentation", "detection"), required=True)
    parser.add_argument("--architecture", required=True,
                        help="semantic_fpn / upernet (segmentation), maskrcnn / retinanet (detection)")
    parser.add_argument("--variant", default="shallow", help="'shallow', 'micro' (biformer.dense.tasks.PRESETS) or a "
                        "timm name")
    parser.add_argument("--head-channels", type=int, default=128, help="width of the segmentation head")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget (wall clock)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--val-scenes", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-win", type=int, default=4, help="regions per side (stage 1 of a 128 px scene: 32x32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    print(f"load average at start: {load_average()}", flush=True)
    start = time.perf_counter()
    task = build_task(args)
    train_set, val_set = CachedDataset(task.train_dataset), CachedDataset(task.val_dataset)
    print(f"composed {len(train_set)} train + {len(val_set)} val scenes in {time.perf_counter() - start:.0f} s",
          flush=True)
    model = task.build_model()
    print(f"{args.task}/{args.architecture} on {args.variant}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=args.weight_decay)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=task.collate_fn)
    budget = args.minutes * 60
    model.train()
    step, seen, epoch, running = 0, 0, 0, None
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        epoch += 1
        for batch in loader:
            progress = (time.perf_counter() - start) / budget
            if progress >= 1:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args.lr, progress)
            loss, _parts = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            step, seen = step + 1, seen + len(batch[0])
            value = float(loss.detach())
            running = value if running is None else 0.98 * running + 0.02 * value
            if step % 100 == 0:
                print(f"step {step} epoch {epoch} {time.perf_counter() - start:.0f} s loss {running:.3f} "
                      f"lr {optimizer.param_groups[0]['lr']:.2e} load {load_average()}", flush=True)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = task.evaluate(model, DataLoader(val_set, batch_size=args.batch_size, collate_fn=task.collate_fn))
    results = dict(
        task=args.task, architecture=args.architecture, variant=args.variant, image_size=args.image_size,
        train_seconds=round(train_seconds), steps=step, images_seen=seen, epochs=epoch,
        eval_seconds=round(time.perf_counter() - start), final_train_loss=running,
        load_average_at_end=load_average(), metrics=metrics,
    )
    print(json.dumps(results, indent=1), flush=True)
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
