"""Write this folder's Fashion-MNIST sample from the full IDX files.

    python experiments/fashion_mnist_sample/make_sample.py [/usr/share/datasets/fashion-mnist]

The sample is the first 6000 training and the first 1000 test images of the official files,
in their order (every class occurs 560-643 and 87-115 times), gzip-compressed with no
timestamp: the same full set always gives the same bytes.
"""
import os
import sys

from cnnx.data.datasets import FASHION_MNIST_DIR, load_fashion_mnist, write_idx

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"train": 6000, "t10k": 1000}


def main(source=FASHION_MNIST_DIR):
    train, test = load_fashion_mnist(source)
    for prefix, part in (("train", train), ("t10k", test)):
        n = SIZES[prefix]
        write_idx(os.path.join(HERE, f"{prefix}-images-idx3-ubyte.gz"), part.images[:n, ..., 0])
        write_idx(os.path.join(HERE, f"{prefix}-labels-idx1-ubyte.gz"),
                  part.labels[:n].astype("uint8"))
    print(f"wrote {SIZES['train']} training and {SIZES['t10k']} test images to {HERE}")


if __name__ == "__main__":
    main(*sys.argv[1:])
