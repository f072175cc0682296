"""What ingest, ingest_arrays and make_synthetic return: a summary a CLI can print."""
from dataclasses import dataclass, field


@dataclass
class StoreSummary:
    store: str
    n_images: int
    image_shape: tuple
    class_names: tuple
    counts: tuple
    chunk_size: int
    n_chunks: int
    mean: tuple
    std: tuple
    skipped: list = field(default_factory=list)   # [{"path": ..., "reason": ...}]
    seconds: float = 0.0
    resumed_chunks: int = 0                       # chunks found done by an earlier run

    @property
    def images_per_second(self):
        return self.n_images / self.seconds if self.seconds > 0 else float("nan")

    @classmethod
    def from_group(cls, store, group, seconds, resumed_chunks=0):
        attrs = group.attrs.asdict()
        images = group["images"]
        return cls(store=store, n_images=int(images.shape[0]),
                   image_shape=tuple(int(s) for s in images.shape[1:]),
                   class_names=tuple(attrs["class_names"]), counts=tuple(attrs["counts"]),
                   chunk_size=int(images.chunks[0]),
                   n_chunks=-(-int(images.shape[0]) // int(images.chunks[0])),
                   mean=tuple(round(m, 3) for m in attrs["mean"]),
                   std=tuple(round(s, 3) for s in attrs["std"]),
                   skipped=list(attrs.get("skipped", [])), seconds=seconds,
                   resumed_chunks=resumed_chunks)

    def __str__(self):
        classes = ", ".join(f"{name}: {count}" for name, count in
                            zip(self.class_names, self.counts))
        lines = [f"{self.store}: {self.n_images} images {self.image_shape} in {self.n_chunks} "
                 f"chunks of {self.chunk_size} ({classes})",
                 f"  mean {self.mean}, std {self.std}; {self.seconds:.1f} s "
                 f"({self.images_per_second:.0f} images/s)"]
        if self.resumed_chunks:
            lines.append(f"  resumed: {self.resumed_chunks} chunks were already written")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} files:")
            lines += [f"    {s['path']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)
