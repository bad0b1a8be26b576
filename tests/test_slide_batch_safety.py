"""Slides whose TIFF directories lie about their size, long slide reads (progress, Ctrl-C), CLI
values out of range, bad Dask scheduler addresses, TLS, and predict-many's handling of a bad
slide (no retries, no tracebacks): issue 12, "slides/batch"."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import tifffile
from _generated import tissue_image
from PIL import Image
from test_batch import inputs  # noqa: F401 - module fixture: (segmenter run, generated slides)

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.errors import Cancelled, SlideError
from napari_histo_wsss.core.slides import slide as slide_mod
from napari_histo_wsss.core.slides.slide import open_slide

GIANT = 200_000  # px a side: 782 x 782 = 611,524 tiles of 256 px, 120 GB of RGB
GIANT_TILES = 782 * 782


def _tiled_tiff(width: int, height: int, tiles: list[bytes], entries: int | None = None, compression: int = 8,
                same_tile: bool = False) -> bytes:
    """A classic little-endian tiled RGB TIFF with 256-px tiles written byte by byte, so that its
    tile table can say what a forged or damaged file says: ``entries`` table entries (default:
    one per declared tile), the first ``len(tiles)`` pointing at ``tiles``, the rest zero; with
    ``same_tile`` every entry points at ``tiles[0]`` (a consistent table over one stored tile)."""
    n = entries if entries is not None else -(-width // 256) * -(-height // 256)
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    offsets, counts = np.zeros(n, "<u4"), np.zeros(n, "<u4")
    for i, t in enumerate(tiles):
        offsets[i], counts[i] = len(out), len(t)
        out += t
    if same_tile:
        offsets[:], counts[:] = offsets[0], counts[0]

    def table(values: np.ndarray) -> int:
        if n == 1:
            return int(values[0])  # a single LONG sits in the tag itself
        pos = len(out)
        out.extend(values.tobytes())
        return pos

    off_at, cnt_at = table(offsets), table(counts)
    bps_at = len(out)
    out += struct.pack("<3H", 8, 8, 8)
    ifd = len(out)
    out[4:8] = struct.pack("<I", ifd)
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bps_at), (259, 3, 1, compression), (262, 3, 1, 2),
            (277, 3, 1, 3), (284, 3, 1, 1), (322, 3, 1, 256), (323, 3, 1, 256), (324, 4, n, off_at), (325, 4, n, cnt_at)]
    out += struct.pack("<H", len(tags))
    for code, kind, count, value in tags:
        out += struct.pack("<HHIHH", code, kind, count, value, 0) if kind == 3 and count == 1 else \
            struct.pack("<HHII", code, kind, count, value)
    out += struct.pack("<I", 0)
    return bytes(out)


def _tile(value: int, compress: bool = True) -> bytes:
    raw = np.full((256, 256, 3), value, np.uint8).tobytes()
    return zlib.compress(raw, 9) if compress else raw


@pytest.fixture(scope="module")
def giant_tiff(tmp_path_factory):
    """A consistent 200000 x 200000 px tiled TIFF (every tile entry points at one stored tile):
    it must open at once, and reading all of it takes many minutes."""
    path = tmp_path_factory.mktemp("giant") / "giant.tif"
    path.write_bytes(_tiled_tiff(GIANT, GIANT, [_tile(230)], same_tile=True))
    return path


# -- declared size vs tile tables ------------------------------------------------------------------
def test_huge_declared_size_over_a_one_entry_tile_table_is_refused_fast(tmp_path):
    bad = tmp_path / "short-table.tif"
    bad.write_bytes(_tiled_tiff(GIANT, GIANT, [_tile(200)], entries=1))
    assert bad.stat().st_size < 1000
    t0 = time.perf_counter()
    with pytest.raises(SlideError, match=rf"short-table\.tif: .*{GIANT} x {GIANT} px in {GIANT_TILES} tiles .*lists only 1"):
        open_slide(bad)
    assert time.perf_counter() - t0 < 5
    # the CLI says it in one line, at once (it used to run for more than 10 minutes, silently)
    assert main(["info", str(bad)]) == 2


def test_tiles_without_data_most_refused_a_few_warned_and_read_white(tmp_path, capsys):
    empty = tmp_path / "placeholder.tif"  # 611,524 table entries, one with data: ~4.9 MB
    empty.write_bytes(_tiled_tiff(GIANT, GIANT, [_tile(200)]))
    with pytest.raises(SlideError, match=rf"placeholder\.tif: .*{GIANT_TILES - 1} of its {GIANT_TILES} tiles have no data"):
        open_slide(empty)

    holes = tmp_path / "holes.tif"  # 1024 x 1024: 12 of 16 tiles stored, the last row missing
    holes.write_bytes(_tiled_tiff(1024, 1024, [_tile(200)] * 12))
    with pytest.warns(slide_mod.SlideWarning, match=r"holes\.tif: 4 of the 16 tiles .* no data"):
        s = open_slide(holes)
    with s:
        assert (s.read_region((0, 0), 0, (4, 4)) == 200).all()
        assert (s.read_region((0, 1000), 0, (4, 4)) == 255).all()  # missing: white glass, not black


def test_tile_data_past_the_end_and_short_uncompressed_tiles_are_refused(tmp_path):
    data = bytearray(_tiled_tiff(512, 512, [_tile(v) for v in (10, 20, 30, 40)]))
    with tifffile.TiffFile(_write(tmp_path / "ok.tif", data)) as tf:
        at = tf.pages[0].tags["TileOffsets"].valueoffset
    data[at + 4 : at + 8] = struct.pack("<I", len(data) + 100)  # tile 1 (not the corner one read at open)
    with pytest.raises(SlideError, match=r"beyond\.tif: .*1 of its 4 tiles lie past the end of the file"):
        open_slide(_write(tmp_path / "beyond.tif", data))

    raw = tmp_path / "raw.tif"  # uncompressed, 611,524 entries all on one 196 KB tile: 120 GB declared
    raw.write_bytes(_tiled_tiff(GIANT, GIANT, [_tile(200, compress=False)], compression=1, same_tile=True))
    with pytest.raises(SlideError, match=r"raw\.tif: .*uncompressed .* the file has only"):
        open_slide(raw)


def _write(path, data) -> object:
    path.write_bytes(bytes(data))
    return path


def test_vendor_svs_whose_directory_declares_a_larger_image_is_refused(cmu_svs, tmp_path):
    data = bytearray(cmu_svs.read_bytes())
    with tifffile.TiffFile(cmu_svs) as tf:
        tags = tf.pages[0].tags
        for name in ("ImageWidth", "ImageLength"):
            assert tags[name].dtype == 3  # SHORT
            data[tags[name].valueoffset : tags[name].valueoffset + 2] = struct.pack("<H", 60000)
    bad = _write(tmp_path / "patched.svs", data)
    with pytest.raises(SlideError, match=r"patched\.svs: .*60000 x 60000 px in 62500 tiles .*lists only 130"):
        open_slide(bad)


# -- a huge consistent slide: lazy open, long reads with progress and stop ---------------------------
def test_huge_consistent_slide_opens_lazily_and_long_reads_report_progress_and_stop(giant_tiff):
    from napari_histo_wsss.core.slides.tissue import detect_tissue

    t0 = time.perf_counter()
    with open_slide(giant_tiff) as s:
        assert time.perf_counter() - t0 < 5 and s.dimensions == (GIANT, GIANT) and s.native_levels == 1
        calls = []

        def progress(done: int, total: int) -> None:
            calls.append((done, total))
            if done == 3:
                raise Cancelled("stopped by the test")

        t0 = time.perf_counter()
        with pytest.raises(Cancelled), slide_mod.read_progress(progress):
            detect_tissue(s)
        assert time.perf_counter() - t0 < 20
        assert [d for d, _ in calls] == [1, 2, 3] and calls[0][1] > 10_000  # blocks of the whole level 0
        assert (s.read_region((GIANT - 2, GIANT - 2), 0, (2, 2)) == 230).all()  # still readable afterwards


def test_cli_info_shows_progress_on_a_long_read_and_ctrl_c_ends_it_in_one_line(giant_tiff):
    proc = subprocess.Popen([sys.executable, "-m", "napari_histo_wsss", "info", str(giant_tiff)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(c) for c in iter(lambda: proc.stderr.read1(4096), b"")],
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while b"tissue mask" not in err and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b"tissue mask" in err and b"block" in err, err.decode(errors="replace")[-2000:]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    text = err.decode(errors="replace")
    assert rc == 130, text[-2000:]
    assert "Traceback" not in text
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "tissue mask" not in ln]
    assert lines == ["histo-wsss info: interrupted"], lines


# -- CLI values out of range: one line, exit 2 ---------------------------------------------------------
def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_evaluate_ignore_index_and_overview_max_size_out_of_range_are_one_line(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for d in (pred, gt):
        d.mkdir()
        Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), mode="L").save(d / "m.png")
    for bad in ("99", "4", "-5"):
        assert main(["evaluate", str(pred), str(gt), "--classes", "wsss4luad", "--ignore-index", bad]) == 2
        _one_error_line(capsys, f"--ignore-index {bad}", "0..3")
    assert main(["evaluate", str(pred), str(gt), "--classes", "wsss4luad", "--ignore-index", "3", "--json"]) == 0
    capsys.readouterr()

    slide = tmp_path / "slide.png"
    Image.fromarray(tissue_image(300, 200, 5)).save(slide)
    for bad in ("0", "-3"):
        assert main(["overview", str(slide), str(tmp_path / "o.png"), "--max-size", bad]) == 2
        _one_error_line(capsys, f"--max-size must be a positive number of pixels, got {bad}")
    assert not (tmp_path / "o.png").exists()
    assert main(["info", str(slide), "--min-tissue", "3"]) == 2
    _one_error_line(capsys, "--min-tissue")


# -- Dask schedulers ---------------------------------------------------------------------------------
def _loopback_server(reply: bytes | None) -> tuple[socket.socket, int]:
    """A loopback TCP server that is not a Dask scheduler: it accepts and then sends ``reply``
    (e.g. an HTTP answer) or nothing at all."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    kept = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            if reply:
                conn.sendall(reply)
            kept.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_bad_scheduler_addresses_are_one_line_within_seconds(inputs, tmp_path, capsys):  # noqa: F811
    run, slides = inputs
    base = ["predict-many", str(run), str(slides["c"]), "--out", str(tmp_path / "out")]
    assert main(base + ["--scheduler", "http://127.0.0.1:1"]) == 2
    _one_error_line(capsys, "http://127.0.0.1:1", "not a Dask scheduler address")
    assert main(base + ["--scheduler", "tls://127.0.0.1:1"]) == 2
    _one_error_line(capsys, "tls://127.0.0.1:1", "needs certificates")

    silent, silent_port = _loopback_server(None)
    http, http_port = _loopback_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    closed_port = free.getsockname()[1]
    free.close()  # nothing listens there any more
    try:
        for port, needle in ((silent_port, "no Dask scheduler answered within 2 s"),
                             (http_port, "did not answer like a Dask scheduler"),
                             (closed_port, "cannot reach the Dask scheduler")):
            t0 = time.perf_counter()
            assert main(base + ["--scheduler", f"tcp://127.0.0.1:{port}", "--connect-timeout", "2"]) == 2
            assert time.perf_counter() - t0 < 10
            _one_error_line(capsys, f"tcp://127.0.0.1:{port}", needle)
    finally:
        silent.close()
        http.close()
    assert not (tmp_path / "out").exists()


def test_tls_files_are_checked_and_a_tls_scheduler_is_used_with_them(inputs, tmp_path, capsys):  # noqa: F811
    run, slides = inputs
    base = ["predict-many", str(run), str(slides["c"]), "--out", str(tmp_path / "out")]
    assert main(base + ["--scheduler", "tls://127.0.0.1:1", "--tls-ca", str(tmp_path / "ca.pem")]) == 2
    _one_error_line(capsys, "--tls-cert", "--tls-key")
    assert main(base + ["--scheduler", "tls://127.0.0.1:1", "--tls-ca", str(tmp_path / "ca.pem"),
                        "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "c.key")]) == 2
    _one_error_line(capsys, "ca.pem", "not found")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    from distributed import LocalCluster
    from distributed.security import Security

    ca, cert, key = _certificates(tmp_path)
    tls = ["--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    assert main(base + ["--scheduler", "tcp://127.0.0.1:1"] + tls) == 2
    _one_error_line(capsys, "unencrypted tcp://", "use tls://127.0.0.1:1")

    server = Security(tls_ca_file=str(ca), tls_scheduler_cert=str(cert), tls_scheduler_key=str(key),
                      tls_worker_cert=str(cert), tls_worker_key=str(key), tls_client_cert=str(cert),
                      tls_client_key=str(key), require_encryption=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None, protocol="tls://",
                      host="127.0.0.1", security=server) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        assert main(base + ["--scheduler", address, "--tile", "128", "--overlap", "16", "--device", "cpu"] + tls) == 0
        assert "c.jpg: done" in capsys.readouterr().out


def _certificates(folder) -> tuple:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it (PEM files)."""
    ca, ca_key, cert, key, csr = (folder / n for n in ("ca.pem", "ca.key", "node.pem", "node.key", "node.csr"))
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    return ca, cert, key


# -- predict-many: a bad slide is not retried and prints no traceback ---------------------------------
def test_a_bad_slide_is_not_retried_and_failures_print_no_traceback(inputs, tmp_path, capfd, caplog, monkeypatch):  # noqa: F811
    run, slides = inputs
    real = slide_mod.open_slide
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def counting(path, *args, **kwargs):
        name = os.path.basename(str(path))
        with lock:
            calls[name] = calls.get(name, 0) + 1
        if name == "a.png":  # a share that keeps failing: transient, so retried, then reported
            raise OSError(errno.ESTALE, "Stale file handle", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(slide_mod, "open_slide", counting)
    argv = ["predict-many", str(run), str(slides["corrupt"]), str(slides["a"]), str(slides["c"]), "--out",
            str(tmp_path / "out"), "--threads", "--workers", "2", "--retries", "2", "--tile", "128", "--overlap", "16",
            "--device", "cpu"]
    caplog.set_level(logging.INFO)
    assert main(argv) == 1
    out, err = capfd.readouterr()
    # distributed logs task errors with their tracebacks to its own stderr handler, or (as under
    # pytest, where logging is configured) to the root logger's handlers: caplog sees those.
    dask_log = "\n".join(f"{r.name}: {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
                          if r.name.startswith("distributed"))
    assert "Compute Failed" not in dask_log and "Traceback" not in dask_log, dask_log
    assert calls["d_corrupt.tif"] == 1  # a damaged file fails the same way every time: no retries
    assert calls["a.png"] == 3 and calls["c.jpg"] == 1  # a transient I/O error: 1 + 2 retries
    for line in (ln for ln in out.splitlines() if ln.startswith("[")):
        assert "d_corrupt.tif: failed" in line or "a.png: failed" in line or "c.jpg: done" in line, out
    assert "d_corrupt.tif: failed (" in out and "past the end of the file" in out
    assert "a.png: failed (" in out and "Stale file handle" in out
    assert "Traceback" not in err and "Compute Failed" not in err, err
    assert [ln for ln in err.splitlines() if ln.strip()] == \
        ["histo-wsss predict-many: 2 slide(s) failed: d_corrupt.tif, a.png"], err


# -- tifffile's own log lines ------------------------------------------------------------------------
def _declared_larger(path, side: int = GIANT) -> None:
    """A real 256-px tiled TIFF whose directory then declares ``side`` x ``side`` px."""
    tifffile.imwrite(path, tissue_image(256, 256, 7), tile=(128, 128), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tf.pages[0].tags["ImageWidth"].overwrite(side)
        tf.pages[0].tags["ImageLength"].overwrite(side)


def test_a_refused_tiff_prints_only_our_line_not_tifffiles(tmp_path, capsys, caplog):
    """tifffile logged "shaped series shape does not match page shape" before our one line."""
    bad = tmp_path / "huge.tif"
    _declared_larger(bad)
    caplog.set_level(logging.DEBUG)
    for argv in (["info", str(bad)], ["overview", str(bad), str(tmp_path / "o.png")]):
        assert main(argv) == 2
        _one_error_line(capsys, "huge.tif", f"declares {GIANT} x {GIANT} px")
    assert [r.getMessage() for r in caplog.records if r.name == "tifffile"] == []
    assert not (tmp_path / "o.png").exists()
    # a file that opens keeps tifffile's remarks (only a refused file's are dropped)
    caplog.clear()
    ok = tmp_path / "ok.tif"
    tifffile.imwrite(ok, tissue_image(256, 256, 7), tile=(128, 128), photometric="rgb")
    logging.getLogger("tifffile").warning("a remark while %s opens", "ok.tif")  # what a benign remark looks like
    with slide_mod._tifffile_log_held():
        logging.getLogger("tifffile").warning("held remark")
    assert [r.getMessage() for r in caplog.records if r.name == "tifffile"] == ["a remark while ok.tif opens",
                                                                               "held remark"]
    with open_slide(ok) as s:
        assert s.dimensions == (256, 256)


# -- predict-many: the run and the destination are checked once, before any slide ---------------------
def test_predict_many_checks_its_output_and_its_run_before_any_slide(inputs, tmp_path, capsys):  # noqa: F811
    """These used to fail slide by slide (an output folder among the slides was even accepted)."""
    run, slides = inputs
    folder = tmp_path / "slides"
    shutil.copytree(slides["a"].parent, folder)
    before = sorted(p.name for p in folder.iterdir())
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    stage_one_only = tmp_path / "cls"
    (stage_one_only / "checkpoints").mkdir(parents=True)
    from napari_histo_wsss.core.data.classes import get_preset
    from napari_histo_wsss.core.models import CAMClassifier, save_model

    save_model(stage_one_only / "checkpoints" / "best.pt", CAMClassifier(4, "efficientnet-lite0", "none", 32),
               {"classes": get_preset("wsss4luad")})
    garbage = tmp_path / "garbage"
    shutil.copytree(run, garbage)
    (garbage / "checkpoints" / "best.pt").write_bytes(b"\x80not a checkpoint" * 10)
    cases = [
        (run, folder, folder, "would replace the input"),
        (run, folder, folder / "preds", "lies inside the input"),
        (run, folder / "a.png", folder, "contains the input"),
        (run, folder / "a.png", run, "would replace"),
        (run, folder / "a.png", blocker / "out", "blocker is a file, not a folder"),
        (run, folder / "a.png", tmp_path / ("n" * 300), "is too long"),
        (stage_one_only, folder / "a.png", tmp_path / "o1", "holds a classifier model, not a segmenter"),
        (garbage, folder / "a.png", tmp_path / "o2", "best.pt"),
    ]
    for run_dir, slide, out, says in cases:
        argv = ["predict-many", str(run_dir), str(slide), "--out", str(out), "--threads", "--workers", "1",
                "--tile", "128", "--overlap", "16", "--device", "cpu"]
        assert main(argv) == 2, (out, says)
        _one_error_line(capsys, "histo-wsss predict-many: error:", says)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
