"""The one file format of cnnx: model files and checkpoints are npz archives, written
atomically and read only after every entry's header has been checked.

An archive is a zip of .npy entries (what np.savez writes, so `np.load` still opens it):
  weights/<layer>/<param>      arrays, the model's params and state
  optimizer/<key>              arrays, Optimizer.state_dict()
  <document>                   a JSON document stored as a 0-d str array ("architecture",
                               "compile" in model files, "meta" in checkpoints)
Writing: a temporary file in the target's folder, flushed and fsynced, renamed over the
target, then the folder fsynced: a crash leaves the old file or the new one, never half.
Reading: the .npy header of every entry is read first (no pickles, no object dtypes) and its
shape x itemsize checked against the size the zip declares for it, so the caller can compare
the declared shapes with what it expects before a single large array is allocated.
"""
import json
import math
import os
import secrets
import struct
import zipfile
import zlib

import numpy as np

WEIGHTS, OPTIMIZER = "weights", "optimizer"
_GROUPS = (WEIGHTS, OPTIMIZER)
_ARRAY_KINDS = "biuf"                 # bool, int, uint, float: nothing that can hold objects
DOCUMENT_LIMIT = 64 * 2**20           # stored bytes of one JSON document (4 bytes a character)
_HEADER_LIMIT = 10000                 # numpy's own bound on a .npy header
# what zipfile and numpy raise on a damaged or foreign file (an unsupported compression or
# zip version, encryption, bad offsets, short reads, broken deflate streams, bad headers)
_DAMAGED = (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError,
            OSError, struct.error, zlib.error, OverflowError)
_READ_BLOCK = 2**20                  # zipfile's readinto reads into a temporary first


class ArchiveError(ValueError):
    """A file that is not a well-formed cnnx archive, or does not match what the caller
    expects of it (entries, shapes, dtypes, the architecture).  One line naming the path."""

    def __init__(self, path, reason):
        self.path, self.reason = path, " ".join(str(reason).split())   # always one line
        super().__init__(f"cannot load {path!r}: {self.reason}")

    def __reduce__(self):                     # Dask pickles errors raised on its workers
        return type(self), (self.path, self.reason)


class Header:
    """What an entry's .npy header declares, read before any of its data."""

    def __init__(self, shape, dtype, fortran_order, offset):
        self.shape, self.dtype, self.fortran_order = shape, dtype, fortran_order
        self.offset = offset                  # where the data starts inside the entry

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize      # Python ints: no overflow

    def __repr__(self):
        return f"Header(shape={self.shape}, dtype={self.dtype})"


# ------------------------------------------------------------------------------ writing

def write_archive(path, weights, optimizer_state, documents):
    """Write weights and optimizer_state ({name: array}) and documents ({name: JSON-able})
    to `path` atomically; returns the path.  Nothing is written if a document is not
    JSON-able (TypeError) or too large (ValueError)."""
    path = os.fspath(path)
    entries = {f"{WEIGHTS}/{name}": np.asarray(value) for name, value in weights.items()}
    entries.update({f"{OPTIMIZER}/{name}": np.asarray(value)
                    for name, value in optimizer_state.items()})
    for name, document in documents.items():
        if "/" in name or name in _GROUPS:
            raise ValueError(f"write_archive: document name {name!r} must not contain '/' "
                             f"nor be one of {_GROUPS}")
        text = np.array(json.dumps(document, default=_json_scalar))
        if text.nbytes > DOCUMENT_LIMIT:
            raise ValueError(f"write_archive: document {name!r} takes {text.nbytes} bytes, "
                             f"more than the {DOCUMENT_LIMIT} a reader accepts")
        entries[name] = text
    for name, value in entries.items():
        if value.dtype.kind not in _ARRAY_KINDS and name not in documents:
            raise TypeError(f"write_archive: {name!r} has dtype {value.dtype}; only bool, "
                            f"integer and float arrays are stored (never pickles)")
    _write_atomically(path, entries)
    return path


def _json_scalar(value):
    """json.dumps' fallback: NumPy scalars become the Python numbers they hold."""
    if isinstance(value, np.generic) and value.dtype.kind in _ARRAY_KINDS:
        return value.item()
    raise TypeError(f"a {type(value).__name__} cannot be stored in a JSON document")


def _write_atomically(path, entries):
    folder = os.path.dirname(os.path.abspath(path))
    # O_EXCL with a random name, not mkstemp: the file gets the umask's mode (0644), as
    # a plain open() would give it, not mkstemp's 0600
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **entries)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)                   # make the rename itself survive a crash
    finally:
        os.close(directory)


# ------------------------------------------------------------------------------ reading

class Archive:
    """An open archive whose headers have all been checked; arrays are read on demand.

    weights / optimizer: {name: Header}; documents: the names of the JSON documents.
    Use as a context manager (or call close()).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")          # not found, no permission: not damage
        try:
            self._zip = zipfile.ZipFile(self._file)
        except _DAMAGED as error:
            self._file.close()
            raise ArchiveError(self.path, f"not a zip archive: truncated, or not a file cnnx "
                                          f"wrote ({type(error).__name__}: {error})") from None
        try:
            self.weights, self.optimizer, self._documents = {}, {}, {}
            self._members = {}
            for member in self._zip.infolist():
                self._add(member)
        except BaseException:
            self.close()
            raise

    def _add(self, member):
        if not member.filename.endswith(".npy"):
            raise self.error(f"entry {member.filename!r} is not a .npy array; not a cnnx "
                             f"archive")
        name = member.filename[: -len(".npy")]
        if name in self._members:
            raise self.error(f"entry {name!r} appears twice")
        header = self._read_header(name, member)
        group, _, key = name.partition("/")
        if key:
            if group not in _GROUPS:
                raise self.error(f"unexpected entry {name!r}; a cnnx archive holds "
                                 f"weights/..., optimizer/... and JSON documents")
            if header.dtype.kind not in _ARRAY_KINDS:
                raise self.error(f"{name!r} has dtype {header.dtype}; expected numbers")
            getattr(self, group)[key] = header
        else:
            if header.dtype.kind != "U" or header.shape != ():
                raise self.error(f"not a cnnx archive: entry {name!r} ({header.dtype}, shape "
                                 f"{header.shape}) is neither under weights/ or optimizer/ "
                                 f"nor a JSON document")
            if header.nbytes > DOCUMENT_LIMIT:
                raise self.error(f"document {name!r} declares {header.nbytes} bytes, more "
                                 f"than the {DOCUMENT_LIMIT} allowed")
            self._documents[name] = header
        self._members[name] = member

    def _read_header(self, name, member):
        """The entry's .npy header, checked against the size the zip declares for it."""
        try:
            with self._zip.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    header = np.lib.format.read_array_header_1_0(stream, _HEADER_LIMIT)
                elif version == (2, 0):
                    header = np.lib.format.read_array_header_2_0(stream, _HEADER_LIMIT)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                offset = stream.tell()
        except _DAMAGED as error:
            raise self.error(f"entry {name!r} has no valid .npy header "
                             f"({type(error).__name__}: {error})") from None
        shape, fortran_order, dtype = header
        if dtype.hasobject:
            raise self.error(f"entry {name!r} holds Python objects (dtype {dtype}); cnnx "
                             f"never stores pickles")
        result = Header(tuple(shape), dtype, fortran_order, offset)
        if member.file_size != offset + result.nbytes:
            raise self.error(f"entry {name!r} declares shape {result.shape} of {dtype} "
                             f"({result.nbytes} bytes) but the zip holds "
                             f"{member.file_size - offset} bytes of data for it")
        return result

    def error(self, reason):
        """An ArchiveError about this file (for the callers' own checks)."""
        return ArchiveError(self.path, reason)

    @property
    def documents(self):
        return tuple(self._documents)

    def check_documents(self, required=(), optional=()):
        """Refuse missing required documents and any document not named."""
        missing = [name for name in required if name not in self._documents]
        unexpected = sorted(set(self._documents) - set(required) - set(optional))
        if missing:
            raise self.error(f"missing {', '.join(map(repr, missing))}; not a cnnx "
                             f"{'model file' if 'architecture' in missing else 'archive'}")
        if unexpected:
            raise self.error(f"unexpected entries {unexpected}")

    def check_group(self, group, expected, against):
        """Refuse unless group ("weights" or "optimizer") holds exactly the entries of
        `expected` ({name: (shape, dtype)}), with those shapes and dtypes.  `against` names
        what they come from, for the message ("the architecture", "the model")."""
        found = getattr(self, group)
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        if missing or unexpected:
            raise self.error(f"its {group} do not match {against}: missing {_few(missing)}, "
                             f"unexpected {_few(unexpected)}")
        for name, (shape, dtype) in expected.items():
            header = found[name]
            if header.shape != tuple(shape) or header.dtype != dtype:
                raise self.error(f"{group} {name!r} are {header.dtype} of shape "
                                 f"{header.shape}; {against} expects {np.dtype(dtype)} of "
                                 f"shape {tuple(shape)}")

    def document(self, name):
        """The JSON document `name`, parsed."""
        if name not in self._documents:
            raise self.error(f"missing document {name!r}")
        text = str(self._read_entry(name, self._documents[name]))
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as error:
            raise self.error(f"document {name!r} is not valid JSON ({error})") from None

    def read(self, group, key):
        """The array weights/<key> or optimizer/<key>, allocated at its checked size."""
        return self._read_entry(f"{group}/{key}", getattr(self, group)[key])

    def read_into(self, group, key, out):
        """Read weights/<key> or optimizer/<key> straight into `out` (same shape and dtype,
        C-contiguous): a large model is then held once, not twice."""
        header = getattr(self, group)[key]
        if (header.shape != out.shape or header.dtype != out.dtype or header.fortran_order
                or not out.flags.c_contiguous):
            out[...] = self.read(group, key)
            return out
        self._fill(f"{group}/{key}", header, out)
        return out

    def _read_entry(self, name, header):
        shape = header.shape[::-1] if header.fortran_order else header.shape
        array = np.empty(shape, header.dtype)
        self._fill(name, header, array)
        return array.T if header.fortran_order else array

    def _fill(self, name, header, array):
        view = memoryview(array.reshape(-1).view(np.uint8))        # array is contiguous
        try:
            with self._zip.open(self._members[name]) as stream:
                stream.seek(header.offset)
                done = 0
                while done < len(view):
                    count = stream.readinto(view[done : done + _READ_BLOCK])
                    if not count:
                        raise EOFError(f"data ends after {done} of {len(view)} bytes")
                    done += count
                stream.read(1)                # reach the end: zipfile checks the CRC there
        except _DAMAGED as error:
            raise self.error(f"entry {name!r} is corrupt ({type(error).__name__}: "
                             f"{error})") from None

    def close(self):
        self._zip.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _few(names, limit=5):
    shown = ", ".join(repr(name) for name in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]" if names else "none"


def open_archive(path):
    """Archive(path); FileNotFoundError when there is no file there."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no archive file at {path!r}")
    return Archive(path)
