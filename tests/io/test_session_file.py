"""Tests for qviz.io.session_file: round trips, atomic writes and hostile files."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import zipfile

import numpy as np
import pytest

from qviz.errors import QvizError, SessionFileError
from qviz.io import session_file
from qviz.io.session_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    read_session_file,
    write_session_file,
)


class _Evil:
    """Unpickling this creates (opens for writing) the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(marker) -> bytes:
    return pickle.dumps(_Evil(marker))


def _evil_npy(marker) -> bytes:
    buf = io.BytesIO()
    arr = np.empty(1, dtype=object)
    arr[0] = _Evil(marker)
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _manifest(arrays=None, **extra) -> bytes:
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "arrays": arrays or {}}
    doc.update(extra)
    return json.dumps(doc).encode()


def _make_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_payloads_are_live(tmp_path):
    """Guard: the hostile payloads really do create the marker when unpickled."""
    for i, make in enumerate([_evil_pickle, _evil_npy]):
        marker = tmp_path / f"control{i}"
        data = make(marker)
        if make is _evil_npy:
            obj = np.load(io.BytesIO(data), allow_pickle=True)[0]
        else:
            obj = pickle.loads(data)
        obj.close()
        assert marker.exists()


def test_round_trip(tmp_path):
    manifest = {
        "name": "résumé run",
        "nested": {"a": {"b": [1, 2.5, None, True, "x"]}, "empty": {}},
        "list": [[1, 2], {"k": "v"}],
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "tiny": 1e-300,
        "tuple": (1, 2),
    }
    fortran = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    arrays = {
        "points/conv1.out/hist_counts": np.array([1.5, np.nan, np.inf], dtype=np.float32),
        "ints": np.arange(-3, 3, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(3.25),
        "grid": np.arange(6, dtype=np.int8).reshape(2, 3),
        "fortran": fortran,
        "names": np.array(["a", "ünïcödé", ""]),
        "empty": np.zeros((0, 3), dtype=np.float16),
    }
    out = write_session_file(tmp_path / "s.qviz", manifest, arrays)
    assert out == tmp_path / "s.qviz"
    got_manifest, got_arrays = read_session_file(out)

    assert math.isnan(got_manifest.pop("nan"))
    assert got_manifest["inf"] == math.inf and got_manifest["ninf"] == -math.inf
    expected = {k: v for k, v in manifest.items() if k != "nan"}
    expected["tuple"] = [1, 2]
    assert got_manifest == expected
    assert set(got_arrays) == set(arrays)
    for key, arr in arrays.items():
        assert got_arrays[key].dtype == arr.dtype, key
        assert got_arrays[key].shape == arr.shape, key
        np.testing.assert_array_equal(got_arrays[key], arr)


def test_layout_on_disk(tmp_path):
    path = write_session_file(tmp_path / "s.qviz", {"a": 1}, {"p/c.out/x": np.ones(2)})
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["arrays/p/c.out/x.npy", "manifest.json"]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
        doc = json.loads(zf.read("manifest.json"))
    assert doc["format"] == FORMAT_NAME and doc["version"] == FORMAT_VERSION
    assert doc["arrays"] == {"p/c.out/x": {"dtype": "<f8", "shape": [2]}}
    assert doc["a"] == 1


def test_numpy_scalars_in_manifest(tmp_path):
    manifest = {"f": np.float32(0.1), "i": np.int64(7), "b": np.bool_(True), "s": np.str_("x")}
    path = write_session_file(tmp_path / "s.qviz", manifest, {})
    got, _ = read_session_file(path)
    assert got == {"f": float(np.float32(0.1)), "i": 7, "b": True, "s": "x"}
    assert type(got["f"]) is float and type(got["i"]) is int and type(got["b"]) is bool


@pytest.mark.parametrize(
    "manifest, words",
    [
        ({"a": {"b": object()}}, ["'a'", "'b'", "object"]),
        ({"a": [1, {2: "x"}]}, ["'a'", "[1]", "key 2"]),
        ({"arr": np.zeros(2)}, ["'arr'", "ndarray"]),
        ({"version": 3}, ["reserved"]),
    ],
)
def test_bad_manifest_refused(tmp_path, manifest, words):
    with pytest.raises(SessionFileError) as info:
        write_session_file(tmp_path / "s.qviz", manifest, {})
    for word in words:
        assert word in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "key", ["../x", "/abs", "a/../b", "a..b", "a//b", "a/", "a b", "", "a\\b", "a\x00b"]
)
def test_unsafe_array_key_refused(tmp_path, key):
    with pytest.raises(QvizError):
        write_session_file(tmp_path / "s.qviz", {}, {key: np.ones(1)})
    assert list(tmp_path.iterdir()) == []


def test_object_array_refused_on_write(tmp_path):
    with pytest.raises(SessionFileError, match="numeric or str"):
        write_session_file(tmp_path / "s.qviz", {}, {"x": np.array([1, "a", None], dtype=object)})
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_dir(tmp_path):
    with pytest.raises(SessionFileError, match="does not exist"):
        write_session_file(tmp_path / "nope" / "s.qviz", {}, {})
    assert not (tmp_path / "nope").exists()


def _failing_save(monkeypatch):
    real_save = np.save
    calls = []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("disk on fire")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", save)


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    path = write_session_file(tmp_path / "s.qviz", {"v": "old"}, {"x": np.arange(3)})
    before = path.read_bytes()
    _failing_save(monkeypatch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_session_file(path, {"v": "new"}, {"a": np.ones(5), "b": np.zeros(5)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.qviz"]
    manifest, arrays = read_session_file(path)
    assert manifest == {"v": "old"}
    np.testing.assert_array_equal(arrays["x"], np.arange(3))


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    _failing_save(monkeypatch)
    with pytest.raises(RuntimeError):
        write_session_file(tmp_path / "s.qviz", {}, {"a": np.ones(5), "b": np.zeros(5)})
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(SessionFileError, match="no such file"):
        read_session_file(tmp_path / "absent.qviz")


@pytest.mark.parametrize("keep", [0.5, -1, -30])
def test_truncated_file(tmp_path, keep):
    path = write_session_file(
        tmp_path / "s.qviz", {"a": 1}, {"x": np.random.default_rng(0).random(1000)}
    )
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else len(data) + keep
    path.write_bytes(data[:cut])
    with pytest.raises(SessionFileError, match="truncated or corrupted"):
        read_session_file(path)


def test_corrupted_member_data(tmp_path):
    path = write_session_file(tmp_path / "s.qviz", {}, {"x": np.random.default_rng(0).random(1000)})
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arrays/x.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SessionFileError, match="corrupted"):
        read_session_file(path)


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"hello, world\n", b"PK"])
def test_not_a_zip(tmp_path, content):
    path = tmp_path / "s.qviz"
    path.write_bytes(content)
    with pytest.raises(SessionFileError, match="not a qviz session file|truncated"):
        read_session_file(path)


def test_zip_without_manifest(tmp_path):
    path = _make_zip(tmp_path / "s.qviz", {"readme.txt": b"hi"})
    with pytest.raises(SessionFileError, match=r"not a qviz session file \(no manifest.json\)"):
        read_session_file(path)


def test_foreign_format(tmp_path):
    path = _make_zip(tmp_path / "s.qviz", {"manifest.json": _manifest(format="other-tool")})
    with pytest.raises(SessionFileError, match="not a qviz session file: format is 'other-tool'"):
        read_session_file(path)


def test_newer_version(tmp_path):
    doc = _manifest(version=FORMAT_VERSION + 1)
    path = _make_zip(tmp_path / "s.qviz", {"manifest.json": doc})
    with pytest.raises(SessionFileError, match=f"newer qviz \\(version {FORMAT_VERSION + 1}\\)"):
        read_session_file(path)
    with pytest.raises(SessionFileError, match="upgrade qviz"):
        read_session_file(path)


@pytest.mark.parametrize(
    "bad", [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"format": "qviz-session"}']
)
def test_bad_manifest_json(tmp_path, bad):
    path = _make_zip(tmp_path / "s.qviz", {"manifest.json": bad})
    with pytest.raises(SessionFileError, match="manifest.json|version"):
        read_session_file(path)


def test_raw_pickle_renamed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "s.qviz"
    path.write_bytes(_evil_pickle(marker))
    with pytest.raises(SessionFileError, match="not a qviz session file"):
        read_session_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("declared", ["|O", "<f8"])
def test_object_npy_member_refused(tmp_path, declared):
    marker = tmp_path / "pwned"
    index = {"x": {"dtype": declared, "shape": [1]}}
    path = _make_zip(
        tmp_path / "s.qviz",
        {"manifest.json": _manifest(index), "arrays/x.npy": _evil_npy(marker)},
    )
    with pytest.raises(SessionFileError, match="pickled"):
        read_session_file(path)
    assert not marker.exists()


def test_pickle_member_refused(tmp_path):
    marker = tmp_path / "pwned"
    index = {"x": {"dtype": "<f8", "shape": [1]}}
    path = _make_zip(
        tmp_path / "s.qviz",
        {"manifest.json": _manifest(index), "arrays/x.npy": _evil_pickle(marker)},
    )
    with pytest.raises(SessionFileError):
        read_session_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../evil.npy", "arrays/../../evil.npy", "/etc/evil.npy"])
def test_unsafe_member_name(tmp_path, name):
    path = _make_zip(tmp_path / "s.qviz", {"manifest.json": _manifest(), name: _npy(np.ones(1))})
    with pytest.raises(SessionFileError, match="unsafe member name"):
        read_session_file(path)


def test_unsafe_key_in_index(tmp_path):
    index = {"../x": {"dtype": "<f8", "shape": [1]}}
    path = _make_zip(tmp_path / "s.qviz", {"manifest.json": _manifest(index)})
    with pytest.raises(SessionFileError, match="not allowed"):
        read_session_file(path)


def test_member_not_in_index(tmp_path):
    path = _make_zip(
        tmp_path / "s.qviz", {"manifest.json": _manifest(), "arrays/x.npy": _npy(np.ones(1))}
    )
    with pytest.raises(SessionFileError, match="not in its index"):
        read_session_file(path)


def test_indexed_array_missing(tmp_path):
    index = {"x": {"dtype": "<f8", "shape": [1]}}
    path = _make_zip(tmp_path / "s.qviz", {"manifest.json": _manifest(index)})
    with pytest.raises(SessionFileError, match="lacks the array 'x'"):
        read_session_file(path)


@pytest.mark.parametrize(
    "declared", [{"dtype": "<f4", "shape": [3]}, {"dtype": "<f8", "shape": [1, 3]}]
)
def test_declared_dtype_or_shape_mismatch(tmp_path, declared):
    path = _make_zip(
        tmp_path / "s.qviz",
        {"manifest.json": _manifest({"x": declared}), "arrays/x.npy": _npy(np.ones(3))},
    )
    with pytest.raises(SessionFileError, match="index says"):
        read_session_file(path)


def test_declared_shape_larger_than_member(tmp_path):
    index = {"x": {"dtype": "<f8", "shape": [10**12]}}
    path = _make_zip(
        tmp_path / "s.qviz", {"manifest.json": _manifest(index), "arrays/x.npy": _npy(np.ones(3))}
    )
    with pytest.raises(SessionFileError, match="truncated"):
        read_session_file(path)


def test_size_limit(tmp_path, monkeypatch):
    path = write_session_file(tmp_path / "s.qviz", {}, {"x": np.zeros(100_000)})
    assert path.stat().st_size < 10_000  # compresses well: a small file that unpacks big
    monkeypatch.setattr(session_file, "MAX_TOTAL_BYTES", 100_000)
    with pytest.raises(SessionFileError, match="more than 100000 bytes"):
        read_session_file(path)


# -- activation-outlier statistics in a session file (issue 16) ---------------------------------

def _outlier_session():
    """A live dynamic session on two linears whose first input has channel 5 planted at 30x."""
    import torch

    import qviz

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    calib = [torch.randn(4, 10, 16) for _ in range(3)]
    for batch in calib:
        batch[..., 5] *= 30.0
    return qviz.Session(model, calib, flow="dynamic", progress=False).run(), model, calib


def test_outlier_statistics_survive_save_and_load(tmp_path):
    import pandas as pd

    import qviz

    session, model, calib = _outlier_session()
    frame = session.outliers(top=4)
    assert frame.iloc[0].layer == "0" and frame.iloc[0].channel == 5  # the planted channel, first
    mine = max(float(b[..., 5].abs().max()) for b in calib)  # its abs-max, straight from the data
    assert frame.iloc[0].absmax == pytest.approx(mine, rel=1e-12)
    session.save(tmp_path / "s.qviz")
    manifest, _ = read_session_file(tmp_path / "s.qviz")
    assert [e["layer"] for e in manifest["outliers"]] == ["0", "2"]
    with zipfile.ZipFile(tmp_path / "s.qviz") as zf:  # sections are optional keys: no new version
        assert json.loads(zf.read("manifest.json"))["version"] == FORMAT_VERSION
    loaded = qviz.load(tmp_path / "s.qviz")
    for top in (4, 1, 2**62):
        pd.testing.assert_frame_equal(loaded.outliers(top=top), session.outliers(top=top))
    loaded.save(tmp_path / "again.qviz")  # and a loaded session saves them again
    pd.testing.assert_frame_equal(qviz.load(tmp_path / "again.qviz").outliers(top=2**62),
                                  session.outliers(top=2**62))


def test_a_file_without_outlier_statistics_loads_and_says_so(tmp_path):
    import qviz

    session, _, _ = _outlier_session()
    session.save(tmp_path / "s.qviz")  # outliers() never called: nothing measured, nothing saved
    manifest, _ = read_session_file(tmp_path / "s.qviz")
    assert "outliers" not in manifest
    loaded = qviz.load(tmp_path / "s.qviz")
    assert loaded.to_dataframe().equals(session.to_dataframe())
    with pytest.raises(QvizError, match="holds no activation-outlier statistics"):
        loaded.outliers()


@pytest.mark.parametrize("damage", ["shape", "missing", "tokens", "twice"])
def test_damaged_outlier_statistics_are_refused_by_name(tmp_path, damage):
    import qviz

    session, _, _ = _outlier_session()
    session.outliers()
    session.save(tmp_path / "s.qviz")
    manifest, arrays = read_session_file(tmp_path / "s.qviz")
    if damage == "shape":
        arrays["outliers/1/exceed"] = np.zeros(3, dtype=np.int64)
    elif damage == "missing":
        del arrays["outliers/1/moments"]
    elif damage == "tokens":
        arrays["outliers/1/tokens"] = np.array(0, dtype=np.int64)
    else:
        manifest["outliers"][1]["layer"] = "0"
    write_session_file(tmp_path / "bad.qviz", manifest, arrays)
    where = "manifest.outliers" if damage in ("missing", "twice") else "outliers/1"
    with pytest.raises(SessionFileError, match=where):
        qviz.load(tmp_path / "bad.qviz")
