"""Which samples each virtual shard reads at each step: a pure function of (seed, epoch).

Shard g owns the samples of the chunks c with c % G == g, so its tasks touch only its own
chunks and a worker's cache fills once. Each epoch a shard shuffles its samples with a
generator keyed by (seed, epoch, shard); the epoch has as many steps as the smallest shard
can fill (the remainder of larger shards is left for that epoch).
"""
import numpy as np

SHUFFLE_STREAM = 0x5EED


def shard_indices(indices, chunk_size, n_shards):
    """The sorted sample indices each of the n_shards virtual shards owns."""
    indices = np.sort(np.asarray(indices, np.int64))
    owner = (indices // chunk_size) % n_shards
    return [indices[owner == shard] for shard in range(n_shards)]


def per_shard_batch(batch_size, n_shards):
    if batch_size % n_shards:
        raise ValueError(f"DaskTrainer: batch_size {batch_size} is not divisible by "
                         f"shards={n_shards}; each virtual shard takes an equal part of a step")
    return batch_size // n_shards


def epoch_plan(owned, seed, epoch, shard_batch):
    """int64 (steps, G, shard_batch): the sample indices of every shard at every step."""
    n_steps = min(len(samples) for samples in owned) // shard_batch
    if n_steps == 0:
        smallest = min(len(samples) for samples in owned)
        raise ValueError(f"DaskTrainer: the smallest virtual shard holds {smallest} samples, "
                         f"fewer than one shard batch of {shard_batch}; use fewer shards, a "
                         f"smaller batch_size or a smaller chunk_size")
    plan = np.empty((n_steps, len(owned), shard_batch), np.int64)
    for shard, samples in enumerate(owned):
        order = np.random.default_rng((seed, SHUFFLE_STREAM, epoch, shard)).permutation(len(samples))
        plan[:, shard, :] = samples[order[:n_steps * shard_batch]].reshape(n_steps, shard_batch)
    return plan


def tree_pairs(n_leaves):
    """The fixed reduction tree: a list of levels, each a list of (left, right) or (single,)."""
    levels, width = [], n_leaves
    while width > 1:
        level = [(i, i + 1) for i in range(0, width - 1, 2)]
        if width % 2:
            level.append((width - 1,))
        levels.append(level)
        width = len(level)
    return levels


def broadcast_parents(n_nodes):
    """The binary broadcast tree over nodes 0..n-1 rooted at 0: each node's parent (None
    for the root). A node sends to at most two children; the depth is log2(n)."""
    return [None] + [(node - 1) // 2 for node in range(1, n_nodes)]
