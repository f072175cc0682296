"""Deterministic stratified train/validation/test splits."""
import numpy as np


def stratified_split(labels, train=0.8, val=0.1, test=0.1, seed=0):
    """Index arrays (train, val, test), each sorted, int64.

    Every class is shuffled by its own generator keyed (seed, class), then cut in the given
    fractions, so each part keeps the class proportions and the result depends on nothing but
    the labels, the fractions and the seed. Fractions summing to 1 use every sample; a smaller
    sum leaves the rest out (handy for quick runs on a big store).
    """
    labels = np.asarray(labels).reshape(-1)
    fractions = (train, val, test)
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"split fractions must be >= 0 and sum to at most 1, got "
                         f"train={train}, val={val}, test={test}")
    uses_all = abs(sum(fractions) - 1) <= 1e-9
    parts = ([], [], [])
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = np.random.default_rng((seed, int(label))).permutation(members)
        n = members.size
        n_val = min(round(val * n), n)
        n_test = min(round(test * n), n - n_val)
        n_train = n - n_val - n_test if uses_all else min(round(train * n), n - n_val - n_test)
        cuts = np.cumsum([n_train, n_val, n_test])
        parts[0].append(members[:cuts[0]])
        parts[1].append(members[cuts[0]:cuts[1]])
        parts[2].append(members[cuts[1]:cuts[2]])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64)
                 for p in parts)
