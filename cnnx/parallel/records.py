"""Per-epoch tallies of step records: what DaskTrainer.history holds, resumable mid-epoch.

A checkpoint written in the middle of an epoch carries the tally of the steps done so far
(`to_meta`), so the history entry of a resumed epoch covers the whole epoch, exactly as
an uninterrupted run's does (the sums continue from the same floats in the same order).
"""
import time

SUMMED = ("n_samples", "loss_sum", "n_correct", "scatter_s", "wait_s", "optimizer_s",
          "compute_s", "transfer_s", "bytes_out", "bytes_in", "bytes_between_workers")
PHASES = ("scatter_s", "wait_s", "optimizer_s", "compute_s", "transfer_s")


class EpochTally:
    """Running sums over one epoch's step (or commit) records."""

    def __init__(self, epoch, saved=None):
        saved = saved or {}
        if saved and saved.get("epoch") != epoch:
            raise ValueError(f"EpochTally: the saved tally is of epoch {saved.get('epoch')}, "
                             f"not {epoch}")
        self.epoch = epoch
        self.sums = {name: saved.get("sums", {}).get(name, 0) for name in SUMMED}
        self.steps = int(saved.get("steps", 0))
        self._elapsed_before = float(saved.get("time_s", 0.0))
        self._started = time.perf_counter()

    def add(self, record):
        self.steps += 1
        for name in SUMMED:
            self.sums[name] += record.get(name, 0)

    def elapsed(self):
        return self._elapsed_before + time.perf_counter() - self._started

    def to_meta(self):
        """A JSON-able dict that EpochTally(epoch, saved=...) continues from."""
        return {"epoch": self.epoch, "steps": self.steps, "time_s": self.elapsed(),
                "sums": dict(self.sums)}

    def summary(self):
        """The history entry of the epoch."""
        seconds, n = self.elapsed(), self.sums["n_samples"]
        summary = {"epoch": self.epoch, "steps": self.steps, "time_s": seconds,
                   "images_per_s": n / seconds if seconds else 0.0}
        if n:
            summary["loss"] = self.sums["loss_sum"] / n
            summary["accuracy"] = self.sums["n_correct"] / n
        summary.update({phase: self.sums[phase] for phase in PHASES})
        for name in ("bytes_out", "bytes_in", "bytes_between_workers"):
            summary[name] = int(self.sums[name])
        return summary
