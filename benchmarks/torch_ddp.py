"""PyTorch DistributedDataParallel (gloo, one thread per process) training step, for the
scaling comparison; run in its own process (torch and cnnx must not share one).

    python benchmarks/torch_ddp.py NET BATCH_PER_PROCESS WORLD_SIZE [--steps N]

prints one JSON line: {"net", "batch", "world_size", "images_per_s", "step_s", ...}, where
images/s = world_size * batch / median step time of rank 0 (forward, backward with the
gradient all-reduce, Adam). Preload tcmalloc from the caller for PyTorch's best case.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_training import SHAPES, network  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank, world_size, port, name, batch, steps, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    torch.manual_seed(0)
    model = network(name).to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(rank)
    x = torch.rand(batch, *SHAPES[name], generator=generator).contiguous(
        memory_format=torch.channels_last)
    classes = 2 if name == "glasses" else 10
    y = torch.randint(0, classes, (batch,), generator=generator)
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(ddp.parameters(), 1e-3)
    times = []
    for step in range(steps + 3):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(ddp(x), y).backward()
        optimizer.step()
        if step >= 3:
            times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(statistics.median(times))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("net", choices=["glasses", "fashion"])
    parser.add_argument("batch", type=int)
    parser.add_argument("world_size", type=int)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=run, args=(rank, args.world_size, port, args.net,
                                                   args.batch, args.steps, queue))
                 for rank in range(args.world_size)]
    for process in processes:
        process.start()
    step_s = queue.get(timeout=600)
    for process in processes:
        process.join()
    print(json.dumps({"net": args.net, "batch": args.batch, "world_size": args.world_size,
                      "step_s": step_s, "images_per_s": args.world_size * args.batch / step_s,
                      "torch": torch.__version__,
                      "ld_preload": os.environ.get("LD_PRELOAD", "")}))


if __name__ == "__main__":
    main()
