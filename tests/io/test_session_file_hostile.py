"""Session files from strangers and unlucky writes: damaged bytes, files that claim more than
they hold, special files, well-formed manifests of the wrong shape, read-only folders and
writes killed midway. Every bad file is a SessionFileError naming it; nothing else escapes."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import qviz
from qviz.cli import main
from qviz.errors import ConfigError, SessionFileError
from qviz.io import atomic
from qviz.io.results_file import load_timeline, save_timeline
from qviz.io.session_file import MAX_TOTAL_BYTES, read_session_file, write_session_file
from qviz.report import build_report
from qviz.ui.app import build_dashboard

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real session file of a tiny FX-quantized model (about 20 KB) and its bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    session = qviz.Session(model, [torch.randn(4, 8) for _ in range(2)], eval_data=[torch.randn(4, 8)],
                           progress=False).run()
    path = tmp_path_factory.mktemp("real") / "tiny.qviz"
    session.save(path)
    return path, path.read_bytes()


def _assert_same(a, b) -> None:
    """Two loaded sessions hold the same results: table, summary, meta and every point."""
    ra, rb = a.results, b.results
    pd.testing.assert_frame_equal(ra.table, rb.table)
    assert json.dumps(ra.summary, sort_keys=True) == json.dumps(rb.summary, sort_keys=True)
    assert ra.meta == rb.meta and list(ra.records) == list(rb.records)
    for name, x in ra.records.items():
        y = rb.records[name]
        assert (x.layer, x.role, x.info) == (y.layer, y.role, y.info)
        for left, right in ((x.arrays, y.arrays), (x.stats.to_arrays(), y.stats.to_arrays())):
            assert set(left) == set(right)
            for k in left:
                np.testing.assert_array_equal(left[k], right[k])


def _flip_positions(data: bytes) -> list[int]:
    """A dense deterministic sample: every 4th byte of the file, and every byte of the manifest
    member, of the first array member, of their central directory entries and of the end record."""
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        central = zf.start_dir
    picked = set(range(0, len(data), 4))
    for info in infos[:2]:
        name = len(info.filename.encode())
        local = info.header_offset + 30 + name + len(info.extra) + info.compress_size
        picked.update(range(info.header_offset, local))
    at = central
    for _ in infos[:2]:
        size = 46 + sum(int.from_bytes(data[at + k:at + k + 2], "little") for k in (28, 30, 32))
        picked.update(range(at, at + size))
        at += size
    picked.update(range(data.rindex(b"PK\x05\x06"), len(data)))
    return sorted(picked)


@pytest.mark.slow
def test_single_byte_flips_load_equal_or_raise_session_file_error(real, tmp_path):
    path, data = real
    original = qviz.load(path)
    positions = _flip_positions(data)
    assert len(positions) > len(data) / 4
    flipped = tmp_path / "flipped.qviz"
    outcomes = {"equal": 0, "refused": 0}
    for i in positions:
        damaged = bytearray(data)
        damaged[i] ^= 0xFF
        flipped.write_bytes(damaged)
        try:
            loaded = qviz.load(flipped)
        except SessionFileError as exc:
            assert str(flipped) in str(exc) and "\n" not in str(exc), (i, str(exc))
            outcomes["refused"] += 1
            continue
        _assert_same(loaded, original)  # a flip in what zipfile does not check (a timestamp, say)
        outcomes["equal"] += 1
    assert outcomes["refused"] > 0 and outcomes["equal"] > 0, outcomes


@pytest.mark.parametrize("head", [b"PK\x05\x06", b"\x00\x00\x00\x00", b"qviz"])
def test_wrong_magic_number(real, tmp_path, head):
    path = tmp_path / "magic.qviz"
    path.write_bytes(head + real[1][4:])
    with pytest.raises(SessionFileError, match="magic.qviz"):
        qviz.load(path)


def test_cli_report_exits_2_with_one_line(real, tmp_path, capsys):
    path = tmp_path / "bad.qviz"
    damaged = bytearray(real[1])
    damaged[0] ^= 0xFF  # the local header's signature: zipfile's "Bad magic number" before
    path.write_bytes(damaged)
    assert main(["report", str(path), "-o", str(tmp_path / "out.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qviz: error: ") and str(path) in err, err
    assert not (tmp_path / "out.html").exists()


# -- what a file may make qviz allocate -------------------------------------------------------
def _npy_header(dtype: str, shape: tuple) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _manifest(arrays=None, **extra) -> str:
    return json.dumps({"format": "qviz-session", "version": 1, "arrays": arrays or {}, **extra})


def _zip(path, members: dict):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("declared", [[3], [93 * 2**30 // 8]])
def test_npy_header_claiming_93_gib(tmp_path, declared):
    """The npy header says 93 GiB; the index says 3 values, or the same 93 GiB: refused before
    anything that size is allocated (numpy's reader raised MemoryError)."""
    member = _npy_header("<f8", (93 * 2**30 // 8,)) + np.zeros(3).tobytes()
    path = _zip(tmp_path / "s.qviz", {"manifest.json": _manifest({"x": {"dtype": "<f8", "shape": declared}}),
                                      "arrays/x.npy": member})
    with pytest.raises(SessionFileError, match="index says|truncated"):
        read_session_file(path)


def _patch_central_size(path, name: str, size: int) -> None:
    """Make the central directory claim that member ``name`` unpacks to ``size`` bytes."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    while True:
        name_len = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + name_len] == name.encode():
            data[at + 24:at + 28] = size.to_bytes(4, "little")
            break
        at = data.index(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


def test_sizes_checked_before_reading(tmp_path):
    """Zip headers that claim more than the cap are refused before a byte is unpacked; ones
    that claim less than the member holds cannot make qviz read more than they claim."""
    path = write_session_file(tmp_path / "s.qviz", {}, {"x": np.arange(1000.0)})
    _patch_central_size(path, "arrays/x.npy", 600 * 2**20)
    with pytest.raises(SessionFileError, match=r"would unpack to \d+ bytes, more than .* max_bytes"):
        read_session_file(path)
    path = write_session_file(tmp_path / "t.qviz", {}, {"x": np.arange(1000.0)})
    _patch_central_size(path, "arrays/x.npy", 200)
    with pytest.raises(SessionFileError, match="truncated|corrupted"):
        read_session_file(path)


def test_manifest_bomb_refused_unread(tmp_path):
    """A manifest of 17 MiB of `[]` (the issue's bomb at 250 MB took 6.5 GB to parse), over the
    cap of max_bytes / 32 = 16 MiB; a smaller max_bytes lowers that cap."""
    path = tmp_path / "bomb.qviz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("manifest.json", "w") as m:
        m.write(_manifest(junk=[]).encode()[:-2])
        chunk = b"[]," * 2**20
        for _ in range(17 * 2**20 // len(chunk) + 1):
            m.write(chunk)
        m.write(b"[]]}")
    assert path.stat().st_size < 100_000
    with pytest.raises(SessionFileError, match=r"manifest.json is \d+ bytes, more than 16777216"):
        qviz.load(path)
    small = _zip(tmp_path / "small.qviz", {"manifest.json": _manifest(junk=[[]] * 20_000)})
    with pytest.raises(SessionFileError, match="max_bytes"):
        qviz.load(small, max_bytes=2**20)


def test_max_bytes_caps_arrays_and_can_be_raised(real, tmp_path):
    assert MAX_TOTAL_BYTES == 512 * 2**20
    path = write_session_file(tmp_path / "s.qviz", {}, {"x": np.zeros(2**20)})  # 8 MiB, packs to 8 KiB
    with pytest.raises(SessionFileError, match=r"more than 4194304 bytes \(max_bytes\).*max_bytes=") as info:
        read_session_file(path, max_bytes=4 * 2**20)
    assert str(path) in str(info.value)
    np.testing.assert_array_equal(read_session_file(path, max_bytes=9 * 2**20)[1]["x"], np.zeros(2**20))
    _assert_same(qviz.load(real[0], max_bytes=2**20), qviz.load(real[0]))
    with pytest.raises(SessionFileError, match="max_bytes"):
        qviz.load(real[0], max_bytes=100_000)
    for bad in (0, -1, 1.5, "1", True):
        with pytest.raises(ConfigError, match="max_bytes"):
            qviz.load(real[0], max_bytes=bad)


# -- special files ----------------------------------------------------------------------------
def _load_within(path, seconds: float = 20.0):
    """qviz.load(path) in a thread; fail if it does not return in time (a FIFO blocked forever)."""
    out = {}

    def target():
        try:
            qviz.load(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["exc"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"qviz.load({path}) still blocked after {seconds} s"
    return out.get("exc")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.qviz"
    os.mkfifo(fifo)
    exc = _load_within(fifo)
    assert isinstance(exc, SessionFileError) and "named pipe" in str(exc) and str(fifo) in str(exc), exc


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_symlink_to_dev_zero_refused(tmp_path, real):
    link = tmp_path / "zero.qviz"
    link.symlink_to("/dev/zero")
    exc = _load_within(link)
    assert isinstance(exc, SessionFileError) and "character device" in str(exc), exc
    good = tmp_path / "good.qviz"
    good.symlink_to(real[0])  # a link to a regular file is fine
    _assert_same(qviz.load(good), qviz.load(real[0]))


def test_directory_refused(tmp_path):
    with pytest.raises(SessionFileError, match="is a directory"):
        qviz.load(tmp_path)


# -- well-formed files of the wrong shape -------------------------------------------------------
_WRONG = {dict: ([], None, "x", 1), list: ({}, None, "x", 1), str: (1, None, [], {}),
          int: ("x", None, [], {}, True, 1.5), float: ("x", [], {}, True), bool: (1, "x", None, [])}


def _mutations(doc: dict, only=None):
    """(where, manifest) pairs: one value of ``doc`` replaced by one of another JSON type; lists
    mutated at their first item only; ``only``: the top-level keys to mutate (default all)."""
    def walk(node, trail):
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node[:1]))
        else:
            items = []
        for key, value in items:
            yield trail + (key,), value
            yield from walk(value, trail + (key,))

    for trail, value in walk(doc, ()):
        if trail[0] in ("format", "version", "arrays") or (only and trail[0] not in only):
            continue
        for wrong in _WRONG.get(type(value), ()):
            mutated = copy.deepcopy(doc)
            node = mutated
            for key in trail[:-1]:
                node = node[key]
            node[trail[-1]] = wrong
            yield ".".join(map(str, trail)) + f" = {json.dumps(wrong)}", mutated


def _rewrite(src, dst, manifest: dict):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = json.dumps(manifest) if info.filename == "manifest.json" else zin.read(info)
            zout.writestr(info.filename, data)


def _assert_refused_or_renders(path, tmp_path, only=None) -> list[str]:
    """Load each mutation of ``path``'s manifest: a SessionFileError naming the file, or a
    session the report and the dashboard render; returns the mutations that loaded."""
    with zipfile.ZipFile(path) as zf:
        doc = json.loads(zf.read("manifest.json"))
    cases = list(_mutations(doc, only))
    target, loaded = tmp_path / "m.qviz", []
    for where, manifest in cases:
        _rewrite(path, target, manifest)
        try:
            session = qviz.load(target)
        except SessionFileError as exc:
            assert str(target) in str(exc), (where, str(exc))
            continue
        loaded.append(where)
        build_report(session)
        build_dashboard(session)
    assert len(loaded) < len(cases) / 10, loaded
    return loaded


@pytest.mark.slow
def test_wrong_typed_manifests_refused_at_load(real, tmp_path):
    """Every generated manifest with a value of the wrong type (322 of them; 41 raised raw
    errors at load, report or dashboard before) is refused at load, naming the field; the few
    that load (null where NaN or "not measured" is allowed) render in the report and dashboard."""
    loaded = _assert_refused_or_renders(real[0], tmp_path)
    assert loaded and all(w.endswith("= null") for w in loaded), loaded


@pytest.mark.slow
def test_wrong_typed_timeline_and_sensitivity_refused_at_load(tmp_path):
    """The same for the QAT timeline and the sensitivity sweep of a real QAT session."""
    from tests.qat_session import qat_session

    session = qat_session()
    session.sensitivity()
    session.save(tmp_path / "qat.qviz")
    loaded = _assert_refused_or_renders(tmp_path / "qat.qviz", tmp_path, only=("timeline", "sensitivity"))
    assert all(w.endswith("= null") for w in loaded), loaded
    # a save_timeline() file, read by load_timeline, is checked the same way
    path = tmp_path / "timeline.qviz"
    save_timeline(session.results.timeline, path)
    with zipfile.ZipFile(path) as zf:
        doc = json.loads(zf.read("manifest.json"))
    refused = 0
    for where, manifest in _mutations(doc):
        _rewrite(path, tmp_path / "t.qviz", manifest)
        try:
            timeline = load_timeline(tmp_path / "t.qviz")
        except SessionFileError as exc:
            assert str(tmp_path / "t.qviz") in str(exc), (where, str(exc))
            refused += 1
            continue
        assert where.endswith("= null"), where
        timeline.to_dataframe()
    assert refused > 50


@pytest.mark.parametrize("where, value, field", [
    ("summary", [], "manifest.summary"), ("meta", None, "manifest.meta"),
    ("points", {}, "manifest.points"), ("table", "x", "manifest.table"),
])
def test_issue_examples_name_the_field(real, tmp_path, where, value, field):
    with zipfile.ZipFile(real[0]) as zf:
        doc = json.loads(zf.read("manifest.json"))
    doc[where] = value
    _rewrite(real[0], tmp_path / "m.qviz", doc)
    with pytest.raises(SessionFileError, match=f"manifest field {field} is"):
        qviz.load(tmp_path / "m.qviz")


@pytest.mark.parametrize("column, dtype, values", [
    ("local_sqnr", "str", "x"), ("quantized", "float64", 1.0), ("type", "int64", 3),
    ("depth", "int64", "0"), ("weight_sqnr", "float64", "high"),
])
def test_table_columns_of_the_wrong_type(real, tmp_path, column, dtype, values):
    with zipfile.ZipFile(real[0]) as zf:
        doc = json.loads(zf.read("manifest.json"))
    table = doc["table"]
    table["dtypes"][table["columns"].index(column)] = dtype
    table["data"][column] = [values] * len(table["index"])
    _rewrite(real[0], tmp_path / "m.qviz", doc)
    with pytest.raises(SessionFileError, match=f"manifest.table.(dtypes|data.{column})"):
        qviz.load(tmp_path / "m.qviz")


# -- writes -----------------------------------------------------------------------------------
_READ_ONLY_CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import qviz
    import qviz.report
    session = qviz.load({src!r})
    qviz.report.build_report(session)  # its lazy imports too
    if os.getuid() == 0:  # root writes anywhere: become nobody (after the imports it cannot read)
        os.setgid(65534)
        os.setuid(65534)
    for write in (session.save, session.report):
        try:
            write({dest!r})
        except qviz.QvizError as exc:
            print(type(exc).__name__, exc)
        else:
            print("written")
""")


@pytest.fixture
def walkable_dir():
    """A fresh folder under /tmp, whose path another user may walk (pytest's tmp_path is 0700)."""
    top = pathlib.Path(tempfile.mkdtemp())
    os.chmod(top, 0o755)
    yield top
    for sub in top.rglob("*"):
        if sub.is_dir():
            os.chmod(sub, 0o755)
    shutil.rmtree(top)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_save_and_report_into_read_only_folder(real, walkable_dir):
    folder = walkable_dir / "ro"
    folder.mkdir()
    src = walkable_dir / "src.qviz"
    src.write_bytes(real[1])
    os.chmod(src, 0o644)
    os.chmod(folder, 0o555)
    code = _READ_ONLY_CHILD.format(root=ROOT, src=str(src), dest=str(folder / "out"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    assert lines[0].startswith("SessionFileError cannot write the session file")
    assert lines[1].startswith("QvizError cannot write the report")
    for line in lines:
        assert f"the folder {folder} is not writable" in line, line
    assert list(folder.iterdir()) == []


_KILLED_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import numpy as np
    from qviz.io.session_file import write_session_file
    real_save = np.save
    def save(*args, **kwargs):  # write the first array, then hang: killed mid-save
        real_save(*args, **kwargs)
        print("mid-save", flush=True)
        time.sleep(600)
    np.save = save
    write_session_file({target!r}, {{"v": "new"}}, {{"a": np.ones(100_000), "b": np.zeros(10)}})
""")


def _saving_child(target):
    """A process blocked in the middle of write_session_file(target), once it says so."""
    code = _KILLED_CHILD.format(root=ROOT, target=str(target))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "mid-save"
    return child


def _temps(folder, name: str) -> list:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{name}.qviz-tmp-"))


@pytest.mark.slow
def test_kill_9_mid_save_leaves_target_and_next_save_cleans_up(tmp_path):
    target = write_session_file(tmp_path / "s.qviz", {"v": "old"}, {"x": np.arange(3)})
    before = target.read_bytes()
    killed = [_saving_child(target) for _ in range(2)]
    for child in killed:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    assert target.read_bytes() == before
    orphans = _temps(tmp_path, "s.qviz")
    assert len(orphans) == 2 and all(p.stat().st_size > 0 for p in orphans)
    assert {p.name.split("-")[-2] for p in orphans} == {str(c.pid) for c in killed}

    live = _saving_child(target)  # a save still running in another process keeps its file
    try:
        write_session_file(target, {"v": "newer"}, {"x": np.arange(4)})
        assert read_session_file(target)[0] == {"v": "newer"}
        left = _temps(tmp_path, "s.qviz")
        assert len(left) == 1 and left[0].name.split("-")[-2] == str(live.pid), left
    finally:
        live.kill()
        live.wait(30)
    removed = atomic.remove_stale_temps(target)  # its process is gone now
    assert [p.name for p in removed] == [left[0].name]
    assert _temps(tmp_path, "s.qviz") == []


def test_report_cleans_its_stale_temps(real, tmp_path):
    """save() and report() write through one helper: the report's stale temp files go too."""
    out = tmp_path / "r.html"
    stale = tmp_path / f".r.html.qviz-tmp-{_dead_pid()}-0000"
    stale.write_bytes(b"half a report")
    mine = tmp_path / f".r.html.qviz-tmp-{os.getpid()}-ffff"  # this process's, but no write uses it
    mine.write_bytes(b"left by an earlier process with this pid")
    other = tmp_path / f".other.html.qviz-tmp-{_dead_pid()}-0000"
    other.write_bytes(b"another target's")
    qviz.load(real[0]).report(out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not stale.exists() and not mine.exists() and other.exists()
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_errors_are_qviz_errors(tmp_path, monkeypatch):
    """Disk full midway: a QvizError saying so, the old file intact, no temp file left."""
    path = write_session_file(tmp_path / "s.qviz", {"v": "old"}, {})
    before = path.read_bytes()
    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SessionFileError, match="could not write the session file .*No space left"):
        write_session_file(path, {"v": "new"}, {"x": np.ones(10)})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.qviz"]


def test_threads_saving_one_target_never_take_each_others_temp_files(tmp_path):
    """Each write's cleanup skips the temp files this process is writing right now."""
    target, errors = tmp_path / "s.qviz", []

    def save(n: int):
        try:
            for i in range(5):
                write_session_file(target, {"by": n, "i": i}, {"x": np.full(50_000, n, dtype=np.float64)})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    manifest, arrays = read_session_file(target)
    np.testing.assert_array_equal(arrays["x"], np.full(50_000, manifest["by"], dtype=np.float64))
    assert _temps(tmp_path, "s.qviz") == []
