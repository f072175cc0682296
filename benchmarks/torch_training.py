"""PyTorch's full training step (forward, backward, Adam) on the benchmark networks, in its
own process (torch and cnnx must not share one: two OpenMP runtimes).

    python benchmarks/torch_training.py NET BATCH THREADS [--channels-last] [--steps N]

prints one JSON line: {"net", "batch", "threads", "channels_last", "images_per_s", ...};
images/s is the median over timed steps.  Preload tcmalloc from the caller for the best
configuration (LD_PRELOAD=libtcmalloc_minimal.so.4).
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn

SHAPES = {"glasses": (3, 80, 80), "comics": (1, 100, 100), "comics_bn_dropout": (1, 100, 100),
          "fashion": (1, 28, 28)}
CLASSES = {"glasses": 2, "comics": 2, "comics_bn_dropout": 2, "fashion": 10}


def network(name):
    """The networks of cnnx.architectures (Keras 'same' = padding=1 for 3x3; the softmax
    lives in CrossEntropyLoss)."""
    if name == "glasses":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(40 * 40 * 32, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 2))
    if name == "comics":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(23 * 23 * 32, 128), nn.ReLU(), nn.Linear(128, 2))
    if name == "comics_bn_dropout":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.BatchNorm2d(32, eps=1e-3, momentum=0.01), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3), nn.BatchNorm2d(32, eps=1e-3, momentum=0.01), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25),
            nn.Linear(23 * 23 * 32, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 2))
    if name == "fashion":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 5 * 64, 128), nn.ReLU(),
            nn.Linear(128, 10))
    raise ValueError(f"unknown network {name!r}; expected one of {sorted(SHAPES)}")


def measure(name, batch, threads, channels_last, steps, warmup=3):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = network(name)
    x = torch.rand(batch, *SHAPES[name])
    y, loss_fn = torch.randint(0, CLASSES[name], (batch,)), nn.CrossEntropyLoss()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("net", choices=sorted(SHAPES))
    parser.add_argument("batch", type=int)
    parser.add_argument("threads", type=int)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    images_per_s = measure(args.net, args.batch, args.threads, args.channels_last, args.steps)
    print(json.dumps({"net": args.net, "batch": args.batch, "threads": args.threads,
                      "channels_last": args.channels_last, "images_per_s": images_per_s,
                      "torch": torch.__version__,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
