"""The qviz session file: a zip archive of one JSON manifest and numpy ``.npy`` arrays.

Session files get shared, so reading one must be safe even when it comes from a
stranger: nothing is ever unpickled or executed, member names are checked, and the
total uncompressed size is capped. Writing is atomic: a failed save never damages
the file that was there before.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
import zipfile
import zlib

import numpy as np

from qviz.errors import SessionFileError

FORMAT_NAME = "qviz-session"
FORMAT_VERSION = 1
MAX_TOTAL_BYTES = 4 * 2**30  # refuse archives that would unpack to more than this (zip bombs)
MAX_MANIFEST_BYTES = 256 * 2**20

_MANIFEST = "manifest.json"
_RESERVED = ("format", "version", "arrays")
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-/:+@=]+")
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


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
    if not path.parent.is_dir():
        raise SessionFileError(
            f"cannot save to {path}: the directory {path.parent} does not exist; create it first"
        )
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

    tmp = tempfile.NamedTemporaryFile(
        delete=False, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(_MANIFEST, text)
                for key, arr in prepared.items():
                    big = arr.nbytes > 2**30
                    with zf.open(f"arrays/{key}.npy", "w", force_zip64=big) as member:
                        np.save(member, arr, allow_pickle=False)
            tmp.flush()
            os.fsync(tmp.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)  # NamedTemporaryFile makes it 0600
        os.replace(tmp.name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp.name)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise SessionFileError(f"could not write {path}: {exc}") from exc
        raise
    return path


def _check_member_name(name: str) -> None:
    """Refuse absolute paths, '..' and backslashes in member names."""
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or ".." in parts or ":" in parts[0]:
        raise SessionFileError(
            f"refusing to read the session file: it holds the unsafe member name {name!r}; "
            "it was not written by qviz and may be malicious"
        )


def _open_zip(path: pathlib.Path) -> zipfile.ZipFile:
    """Open ``path`` as a zip, telling a damaged zip apart from something else entirely."""
    head = b""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        return zipfile.ZipFile(path)
    except FileNotFoundError as exc:
        raise SessionFileError(f"no such file: {path}") from exc
    except IsADirectoryError as exc:
        raise SessionFileError(f"{path} is a directory, not a qviz session file") from exc
    except _CORRUPT as exc:
        if head == b"PK\x03\x04":
            raise SessionFileError(
                f"{path} is truncated or corrupted ({exc}); save the session again"
            ) from exc
        raise SessionFileError(
            f"{path} is not a qviz session file (not a zip archive): "
            "was it written by Session.save()?"
        ) from exc


def _read_manifest(zf: zipfile.ZipFile, path: pathlib.Path) -> dict:
    """Load and check manifest.json: format name, version and the arrays index."""
    if _MANIFEST not in zf.NameToInfo:
        raise SessionFileError(
            f"{path} is not a qviz session file (no manifest.json): "
            "was it written by Session.save()?"
        )
    if zf.getinfo(_MANIFEST).file_size > MAX_MANIFEST_BYTES:
        raise SessionFileError(f"{path}: manifest.json is implausibly large; refusing to read it")
    try:
        doc = json.loads(zf.read(_MANIFEST).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
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


def _check_declared(path: pathlib.Path, key: str, want: dict, member_size: int) -> None:
    """Refuse object dtypes and shapes the member is too small to hold, before reading it."""
    shape = want["shape"]
    try:
        dtype = np.dtype(want["dtype"])
        ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok or dtype.hasobject:
        raise SessionFileError(
            f"{path}: array {key!r} is declared as {want['dtype']} {shape}, which qviz "
            "never reads (qviz never loads pickled data); the file was not written by qviz"
        )
    if int(np.prod(shape, dtype=object)) * dtype.itemsize > member_size:
        raise SessionFileError(f"{path}: array {key!r} is truncated; the file is corrupted")


def read_session_file(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a session file; return ``(manifest, arrays)`` without the format's own keys."""
    path = pathlib.Path(path)
    with _open_zip(path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        for name in names:
            _check_member_name(name)
        if len(set(names)) != len(names):
            raise SessionFileError(f"{path} holds duplicate members; the file is corrupted")
        if sum(i.file_size for i in infos) > MAX_TOTAL_BYTES:
            raise SessionFileError(
                f"{path} would unpack to more than {MAX_TOTAL_BYTES} bytes; refusing to read it"
            )
        doc = _read_manifest(zf, path)
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
        arrays = {}
        for name, key in expected.items():
            if name not in zf.NameToInfo:
                raise SessionFileError(f"{path} lacks the array {key!r}; the file is corrupted")
            _check_declared(path, key, index[key], zf.getinfo(name).file_size)
            try:
                with zf.open(name) as member:
                    arr = np.lib.format.read_array(member, allow_pickle=False)
            except _CORRUPT as exc:
                raise SessionFileError(
                    f"{path}: array {key!r} is truncated, corrupted or not a plain numeric/str "
                    f"array ({exc}); qviz never loads pickled data"
                ) from exc
            want = index[key]
            if arr.dtype.str != want["dtype"] or list(arr.shape) != want["shape"]:
                raise SessionFileError(
                    f"{path}: array {key!r} is {arr.dtype.str} {list(arr.shape)} but the index "
                    f"says {want['dtype']} {want['shape']}; the file is corrupted"
                )
            arrays[key] = arr
    manifest = {k: v for k, v in doc.items() if k not in _RESERVED}
    return manifest, arrays
