"""Time one conv layer forward+backward in PyTorch, in its own process (two OpenMP runtimes
must not share one). Prints JSON {shape_id: median_seconds}.

    python benchmarks/torch_conv.py --threads 2 --channels-last
Run with LD_PRELOAD=libtcmalloc_minimal.so.4 for PyTorch's best configuration.
"""
import argparse
import json
import statistics
import time

SHAPES = [(32, 80, 80, 3, 16), (32, 80, 80, 16, 16), (32, 80, 80, 16, 32)]  # N, H, W, C, F


def shape_id(shape):
    n, h, w, c, f = shape
    return f"{n}x{h}x{w}x{c}->{f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shape", help="only this shape id, e.g. 32x80x80x16->32")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    results = {}
    for shape in SHAPES:
        if args.shape and shape_id(shape) != args.shape:
            continue
        n, h, w, c, f = shape
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        conv = torch.nn.Conv2d(c, f, 3, padding=1).to(memory_format=fmt)
        x = torch.randn(n, c, h, w).to(memory_format=fmt).requires_grad_(c > 3)
        grad = torch.randn(n, f, h, w).to(memory_format=fmt)
        times = []
        for repeat in range(args.repeats + 3):
            start = time.perf_counter()
            conv(x).backward(grad)
            if repeat >= 3:                       # warm-up: allocator, oneDNN primitive cache
                times.append(time.perf_counter() - start)
        results[shape_id(shape)] = statistics.median(times)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
