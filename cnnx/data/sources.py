"""Where ingest's images live: a local folder, `file://`, or any fsspec URL (`s3://` with s3fs).

A source is a folder of class sub-folders. `ImageSource` lists it once, on the driver, and is
picklable: a worker process rebuilds the filesystem from the URL and reads its own files.
"""
import os

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# what a filesystem's info() may carry that changes when the file does
VERSION_KEYS = ("mtime", "ETag", "etag", "LastModified", "last_modified", "updated",
                "md5Hash", "created")


def is_url(location):
    return isinstance(location, str) and "://" in location


def is_in_process(url):
    """True for memory:// locations, which exist only in the process that made them."""
    return isinstance(url, str) and url.startswith("memory://")


def read_bytes(location):
    """The bytes of a local file or of an fsspec URL."""
    location = os.fspath(location)
    if not is_url(location):
        with open(location, "rb") as file:
            return file.read()
    import fsspec
    with fsspec.open(location, "rb") as file:
        return file.read()


class ImageSource:
    """`source/<class>/<images>` at a local path or URL; classes are the sorted sub-folders."""

    def __init__(self, location):
        import fsspec.core
        if isinstance(location, os.PathLike):
            location = os.fspath(location)
        if not isinstance(location, str):
            raise TypeError(f"ingest: source must be a folder path or URL string, got "
                            f"{type(location).__name__}")
        self.url = location if is_url(location) else os.path.abspath(location)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")

    def __getstate__(self):
        return {"url": self.url}

    def __setstate__(self, state):
        self.__init__(state["url"])

    def __repr__(self):
        return f"ImageSource({self.url!r})"

    def path(self, relative):
        return f"{self.root}/{relative}"

    def read(self, relative):
        return self.fs.cat_file(self.path(relative))

    def scan(self):
        """Sorted class names, candidate (relative path, label) pairs, the files skipped at
        once, and each candidate's version (size and mtime, ETag...) for the plan digest."""
        if not self.fs.isdir(self.root):
            raise FileNotFoundError(f"ingest: source folder {self.url!r} does not exist")
        entries = sorted(self.fs.ls(self.root, detail=True), key=lambda e: e["name"])
        names = [(self._relative(e["name"]), e["type"]) for e in entries]
        class_names = [n for n, kind in names if kind == "directory" and not n.startswith(".")]
        skipped = [{"path": n, "reason": "file outside the class sub-folders"}
                   for n, kind in names if kind == "file"]
        if not class_names:
            raise ValueError(f"ingest: {self.url!r} has no class sub-folders; expected one "
                             "sub-folder of images per class (e.g. photos/glasses/*.jpg)")
        candidates, versions = [], {}
        for label, name in enumerate(class_names):
            found = self.fs.find(self.path(name), detail=True)
            infos = {self._relative(path): info for path, info in found.items()}
            files = sorted(infos)
            images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            skipped += [{"path": f, "reason": "not an image file (extensions read: "
                         f"{', '.join(IMAGE_EXTENSIONS)})"} for f in files if f not in images]
            if not images:
                raise ValueError(f"ingest: class folder {self.path(name)!r} holds no image "
                                 f"files ({', '.join(IMAGE_EXTENSIONS)}); remove it or add "
                                 "images")
            candidates += [(f, label) for f in images]
            versions.update({f: _version(infos[f]) for f in images})
        return class_names, candidates, skipped, versions

    def _relative(self, path):
        path = path.rstrip("/")
        return path[len(self.root) + 1:] if path.startswith(self.root + "/") else path


def _version(info):
    changes = next((str(info[k]) for k in VERSION_KEYS if info.get(k) is not None), "")
    return f"{info.get('size')}\0{changes}"
