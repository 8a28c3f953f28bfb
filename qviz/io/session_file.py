"""The qviz session file: a zip archive of one JSON manifest and numpy ``.npy`` arrays.

Session files get shared, so reading one must be safe even when it comes from a
stranger: nothing is ever unpickled or executed, member names are checked, only regular
files are read, and what a file can make qviz allocate is capped (member sizes checked
against the manifest and a total before anything is unpacked). Any defect is a
:class:`SessionFileError`. Writing is atomic (:mod:`qviz.io.atomic`): a failed save never
damages the file that was there before.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import stat
import struct
import tokenize
import zipfile
import zlib

import numpy as np

from qviz.errors import ConfigError, SessionFileError
from qviz.io.atomic import atomic_write

FORMAT_NAME = "qviz-session"
FORMAT_VERSION = 1
#: The most a session file may make qviz allocate for its members, by default (a load's
#: ``max_bytes``). The manifest may take at most a 32nd of it: parsed JSON needs up to ~26x
#: its text in memory (measured: 16 MiB of `[]` took 426 MB).
MAX_TOTAL_BYTES = 512 * 2**20

_MANIFEST = "manifest.json"
_RESERVED = ("format", "version", "arrays")
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-/:+@=]+")
_JSON_GROWTH = 32
_CHUNK = 2**20
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}
_SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
# What zipfile, zlib and numpy's npy header parser raise on damaged bytes.
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError, OSError,
            NotImplementedError, struct.error, OverflowError, SyntaxError, tokenize.TokenError)


def _check_key(key) -> None:
    """Refuse array keys that could escape ``arrays/`` or be ambiguous inside the zip."""
    ok = (
        isinstance(key, str)
        and _KEY_RE.fullmatch(key) is not None
        and ".." not in key
        and "" not in key.split("/")
    )
    if not ok:
        raise SessionFileError(
            f"array key {key!r} is not allowed: use letters, digits and _ . - / : + @ = "
            "only, with no '..', no leading or trailing '/' and no '//'"
        )


def _to_json(value, where: str):
    """Turn numpy scalars into Python ones and refuse anything JSON cannot hold."""
    if isinstance(value, np.generic) and not isinstance(value, np.object_):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SessionFileError(
                    f"{where} has the key {k!r} of type {type(k).__name__}: "
                    "manifest keys must be strings"
                )
            out[str(k)] = _to_json(v, f"{where}[{k!r}]")
        return out
    raise SessionFileError(
        f"{where} is a {type(value).__name__}, which a session manifest cannot hold: "
        "convert it to a number, string, list or dict (put arrays in `arrays`)"
    )


def write_session_file(path, manifest: dict, arrays: dict[str, np.ndarray]) -> pathlib.Path:
    """Write ``manifest`` and ``arrays`` to ``path`` atomically; return the path written."""
    path = pathlib.Path(path)
    if not isinstance(manifest, dict):
        raise SessionFileError(f"the manifest must be a dict, not {type(manifest).__name__}")
    clash = [k for k in _RESERVED if k in manifest]
    if clash:
        raise SessionFileError(
            f"manifest keys {clash} are reserved for the file format: rename them"
        )
    doc = _to_json(manifest, "manifest")
    index, prepared = {}, {}
    for key, arr in arrays.items():
        _check_key(key)
        arr = np.asarray(arr)
        if arr.dtype.hasobject:
            raise SessionFileError(
                f"array {key!r} has dtype object, which would need pickle: "
                "convert it to a numeric or str array"
            )
        index[key] = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
        prepared[key] = arr
    doc.update(format=FORMAT_NAME, version=FORMAT_VERSION, arrays=index)
    text = json.dumps(doc, allow_nan=True, ensure_ascii=False, indent=1)
    with atomic_write(path, what="the session file", error=SessionFileError) as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(_MANIFEST, text)
            for key, arr in prepared.items():
                big = arr.nbytes > 2**30
                with zf.open(f"arrays/{key}.npy", "w", force_zip64=big) as member:
                    np.save(member, arr, allow_pickle=False)
    return path


def _check_member_name(name: str) -> None:
    """Refuse absolute paths, '..' and backslashes in member names."""
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or ".." in parts or ":" in parts[0]:
        raise SessionFileError(
            f"refusing to read the session file: it holds the unsafe member name {name!r}; "
            "it was not written by qviz and may be malicious"
        )


def _refuse_special(st: os.stat_result, path: pathlib.Path, max_bytes: int) -> None:
    """Refuse what is not a regular file (a FIFO would block forever, /dev/zero never ends)
    and files larger than the cap."""
    if stat.S_ISDIR(st.st_mode):
        raise SessionFileError(f"{path} is a directory, not a qviz session file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _SPECIAL if test(st.st_mode)), "not a regular file")
        raise SessionFileError(
            f"{path} is {kind}, not a regular file: qviz reads session files only from "
            "regular files (copy it to one first)"
        )
    if st.st_size > max_bytes:
        raise SessionFileError(_too_big(path, "is", st.st_size, max_bytes))


def _too_big(path: pathlib.Path, verb: str, size: int, max_bytes: int) -> str:
    return (
        f"{path} {verb} {size} bytes, more than {max_bytes} bytes (max_bytes); "
        "refusing to read it. If you trust the file, raise the cap: "
        "qviz.load(path, max_bytes=...)"
    )


def _open_regular(path: pathlib.Path, max_bytes: int):
    """Open ``path`` for reading if it is (a link to) a regular file within the size cap."""
    try:
        _refuse_special(os.stat(path), path, max_bytes)
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SessionFileError(f"no such file: {path}") from exc
    except OSError as exc:
        raise SessionFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:  # the file may have been swapped between stat and open
        _refuse_special(os.fstat(fd), path, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _open_zip(fh, path: pathlib.Path) -> zipfile.ZipFile:
    """Open ``fh`` as a zip, telling a damaged zip apart from something else entirely."""
    head = fh.read(4)
    fh.seek(0)
    try:
        return zipfile.ZipFile(fh)
    except _CORRUPT as exc:
        if head == b"PK\x03\x04":
            raise
        raise SessionFileError(
            f"{path} is not a qviz session file (not a zip archive): "
            "was it written by Session.save()?"
        ) from exc


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, never more than ``limit`` of them however it claims to unpack."""
    with zf.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise SessionFileError(f"{info.filename} unpacks to more than {limit} bytes")
    return data


def _read_manifest(zf: zipfile.ZipFile, path: pathlib.Path, max_bytes: int) -> dict:
    """Load and check manifest.json: format name, version and the arrays index."""
    if _MANIFEST not in zf.NameToInfo:
        raise SessionFileError(
            f"{path} is not a qviz session file (no manifest.json): "
            "was it written by Session.save()?"
        )
    limit = max_bytes // _JSON_GROWTH
    info = zf.getinfo(_MANIFEST)
    if info.file_size > limit:
        raise SessionFileError(
            f"{path}: manifest.json is {info.file_size} bytes, more than {limit} "
            f"(max_bytes / {_JSON_GROWTH}: parsed JSON takes many times its size); refusing "
            "to read it. If you trust the file, raise the cap: qviz.load(path, max_bytes=...)"
        )
    raw = _read_bounded(zf, info, limit)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, huge ints
        raise SessionFileError(
            f"{path}: manifest.json is not valid JSON ({exc}); the file is corrupted"
        ) from exc
    if not isinstance(doc, dict):
        raise SessionFileError(f"{path}: manifest.json is not a JSON object; the file is corrupted")
    if doc.get("format") != FORMAT_NAME:
        raise SessionFileError(
            f"{path} is not a qviz session file: format is {doc.get('format')!r}"
        )
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SessionFileError(f"{path}: invalid format version {version!r}; the file is corrupted")
    if version > FORMAT_VERSION:
        raise SessionFileError(
            f"{path} was written by a newer qviz (version {version}); upgrade qviz to open it"
        )
    index = doc.get("arrays")
    if not isinstance(index, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
        for v in index.values()
    ):
        raise SessionFileError(f"{path}: the arrays index in manifest.json is malformed")
    return doc


def _declared(path: pathlib.Path, key: str, want: dict, member_size: int) -> tuple[np.dtype, int]:
    """The dtype and byte size an index entry declares, refusing object dtypes and shapes the
    member is too small to hold, before anything is read."""
    shape = want["shape"]
    try:
        dtype = np.dtype(want["dtype"])
        ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ok = ok and dtype.str == want["dtype"] and dtype.itemsize > 0
    except (TypeError, ValueError, SyntaxError):
        ok = False
    if not ok or dtype.hasobject:
        raise SessionFileError(
            f"{path}: array {key!r} is declared as {want['dtype']!r} {shape}, which qviz "
            "never reads (qviz never loads pickled data); the file was not written by qviz"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > member_size:
        raise SessionFileError(f"{path}: array {key!r} is truncated; the file is corrupted")
    return dtype, nbytes


def _read_array(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: pathlib.Path, key: str,
                want: dict, nbytes: int) -> np.ndarray:
    """One ``.npy`` member whose header must say what the index says; the data is read in
    chunks into a buffer of exactly the declared size (numpy's reader would allocate whatever
    the header claims)."""
    with zf.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version not in _NPY_HEADERS:
            raise SessionFileError(f"{path}: array {key!r} has an npy format version {version} "
                                   "qviz does not write; the file is corrupted")
        shape, fortran, dtype = _NPY_HEADERS[version](member)
        if dtype.hasobject:
            raise SessionFileError(
                f"{path}: array {key!r} is not a plain numeric/str array; qviz never loads "
                "pickled data"
            )
        if dtype.str != want["dtype"] or list(shape) != want["shape"]:
            raise SessionFileError(
                f"{path}: array {key!r} is {dtype.str} {list(shape)} but the index "
                f"says {want['dtype']} {want['shape']}; the file is corrupted"
            )
        if member.tell() + nbytes != info.file_size:
            raise SessionFileError(f"{path}: array {key!r} has the wrong size; the file is corrupted")
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        while got < nbytes:
            n = member.readinto(view[got : got + _CHUNK])
            if not n:
                raise SessionFileError(f"{path}: array {key!r} is truncated; the file is corrupted")
            got += n
        if member.read(1):  # also where zipfile checks the CRC
            raise SessionFileError(f"{path}: array {key!r} has trailing data; the file is corrupted")
    arr = np.frombuffer(buf, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


def _check_limit(max_bytes) -> int:
    if max_bytes is None:
        return MAX_TOTAL_BYTES
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ConfigError(f"max_bytes must be a positive int (bytes), got {max_bytes!r}")
    return max_bytes


def read_session_file(path, *, max_bytes: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a session file; return ``(manifest, arrays)`` without the format's own keys.

    Nothing the file says is trusted: it must be a regular file; its members must be named and
    sized as its manifest declares; and the arrays may take at most ``max_bytes`` (default
    :data:`MAX_TOTAL_BYTES`), the manifest at most ``max_bytes / 32``, all checked before
    anything is unpacked. Every defect raises :class:`SessionFileError`."""
    path = pathlib.Path(path)
    max_bytes = _check_limit(max_bytes)
    with _open_regular(path, max_bytes) as fh:
        try:
            doc, arrays = _read_zip(fh, path, max_bytes)
        except _CORRUPT as exc:
            raise SessionFileError(
                f"{path} is truncated or corrupted ({type(exc).__name__}: {exc}); "
                "save the session again"
            ) from exc
    manifest = {k: v for k, v in doc.items() if k not in _RESERVED}
    return manifest, arrays


def _read_zip(fh, path: pathlib.Path, max_bytes: int) -> tuple[dict, dict[str, np.ndarray]]:
    with _open_zip(fh, path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        for info in infos:
            _check_member_name(info.filename)
            if info.flag_bits & 0x1 or info.compress_type not in _COMPRESSIONS:
                raise SessionFileError(
                    f"{path}: the member {info.filename!r} is encrypted or uses a compression "
                    "qviz does not write; the file is corrupted or was not written by qviz"
                )
        if len(set(names)) != len(names):
            raise SessionFileError(f"{path} holds duplicate members; the file is corrupted")
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise SessionFileError(_too_big(path, "would unpack to", total, max_bytes))
        doc = _read_manifest(zf, path, max_bytes)
        index = doc["arrays"]
        for key in index:
            try:
                _check_key(key)
            except SessionFileError as exc:
                raise SessionFileError(f"{path}: {exc}; the file is corrupted") from None
        expected = {f"arrays/{key}.npy": key for key in index}
        for name in names:
            if name != _MANIFEST and name not in expected:
                raise SessionFileError(
                    f"{path} holds the member {name!r}, which is not in its index; "
                    "the file was not written by qviz"
                )
        sizes = {}
        for name, key in expected.items():  # every size checked before any array is read
            if name not in zf.NameToInfo:
                raise SessionFileError(f"{path} lacks the array {key!r}; the file is corrupted")
            sizes[key] = _declared(path, key, index[key], zf.getinfo(name).file_size)[1]
        arrays = {key: _read_array(zf, zf.getinfo(name), path, key, index[key], sizes[key])
                  for name, key in expected.items()}
    return doc, arrays
