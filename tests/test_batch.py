"""Many-slide prediction with Dask (core/stage2/batch.py, ``histo-wsss predict-many``): a LocalCluster of
two workers, generated slides plus a corrupt one and a missing one, retries, resume."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from _generated import segmenter_run, write_slides

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.errors import HistoWSSSError
from napari_histo_wsss.core.io.export import ExportError, open_label_pyramid
from napari_histo_wsss.core.slides.slide import open_slide
from napari_histo_wsss.core.stage2 import infer
from napari_histo_wsss.core.stage2.batch import PredictSettings, output_path, plan_jobs, predict_many
from napari_histo_wsss.core.stage2.train import load_segmenter

SETTINGS = PredictSettings(tile=128, overlap=16, batch_size=4, device="cpu", torch_threads=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return segmenter_run(root / "run"), write_slides(root / "slides")


def _by_name(results):
    return {r.slide.name: r for r in results}


def test_two_workers_predict_report_the_corrupt_slide_and_resume(inputs, tmp_path):
    run, slides = inputs
    out = tmp_path / "out"
    missing = slides["a"].parent / "never-scanned.svs"
    order = [slides["a"], slides["b"], slides["corrupt"], missing, slides["c"]]
    seen = []
    results = predict_many(run, order, out, SETTINGS, workers=2, processes=False, retries=1, on_result=seen.append)

    assert [r.slide for r in results] == order  # every slide accounted for, in input order
    assert sorted(r.slide.name for r in seen) == sorted(p.name for p in order)
    res = _by_name(results)
    for key in ("a", "b", "c"):
        r = res[slides[key].name]
        assert r.status == "done", r.error
        assert r.tiles and r.tiles > 0 and r.out == output_path(slides[key], out)
    assert {res[n].worker for n in ("a.png", "b.tif", "c.jpg")} <= {"0", "1"}
    assert res["d_corrupt.tif"].status == "failed"
    assert "d_corrupt.tif" in res["d_corrupt.tif"].error and "truncated" in res["d_corrupt.tif"].error
    assert res["never-scanned.svs"].status == "failed" and "no such file" in res["never-scanned.svs"].error
    assert not output_path(slides["corrupt"], out).exists()

    # Each output is exactly what the single-slide engine writes for that slide.
    model, classes, _, _ = load_segmenter(run)
    ref = tmp_path / "ref.ome.zarr"
    with open_slide(slides["b"]) as slide:
        infer.run_to_end(infer.predict_slide(slide, infer.segmenter_predict_fn(model, classes, "cpu"), ref, tile=128,
                                             overlap=16, batch_size=4, classes=classes))
        w, h = slide.dimensions
    got = open_label_pyramid(res["b.tif"].out)
    assert got.complete and got.read_index(0).shape == (h, w)
    np.testing.assert_array_equal(got.read_index(0), open_label_pyramid(ref).read_index(0))
    assert got.meta["model_saved_at"] and got.meta["slide"] == str(slides["b"])

    # Interrupt c's output: it is recognisably incomplete, and the rerun redoes only it. (A stopped
    # overwrite keeps the old complete output, so the interrupted run writes a fresh one.)
    import shutil

    shutil.rmtree(res["c.jpg"].out)
    with open_slide(slides["c"]) as slide:
        events = list(infer.predict_slide(slide, infer.segmenter_predict_fn(model, classes, "cpu"), res["c.jpg"].out,
                                          tile=128, overlap=16, batch_size=1, classes=classes,
                                          should_stop=iter([False, True, True]).__next__))
    assert events[-1].kind == "cancelled"
    with pytest.raises(ExportError, match="incomplete"):
        open_label_pyramid(res["c.jpg"].out)
    again = _by_name(predict_many(run, order, out, SETTINGS, workers=2, processes=False, retries=0))
    assert again["a.png"].status == again["b.tif"].status == "skipped"
    assert again["c.jpg"].status == "done" and open_label_pyramid(again["c.jpg"].out).complete
    assert again["d_corrupt.tif"].status == "failed"

    # A complete output made with other settings is refused, not passed off; overwrite recomputes.
    other = PredictSettings(tile=256, overlap=16, batch_size=4, device="cpu", torch_threads=1)
    refused = predict_many(run, [slides["a"]], out, other, workers=1, processes=False, retries=0)[0]
    assert refused.status == "failed" and "different tile" in refused.error
    redone = predict_many(run, [slides["a"]], out, replace(other, overwrite=True), workers=1, processes=False)[0]
    assert redone.status == "done" and open_label_pyramid(redone.out).meta["tile"] == 256


def test_a_transient_failure_is_retried_and_reported_when_retries_run_out(inputs, tmp_path, monkeypatch):
    run, slides = inputs
    real = infer.predict_slide
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def flaky(slide, *args, **kwargs):
        with lock:
            calls[slide.path.name] = calls.get(slide.path.name, 0) + 1
            first = calls[slide.path.name] == 1
        if first and slide.path.name == "a.png":
            raise OSError("stale NFS file handle")
        return real(slide, *args, **kwargs)

    monkeypatch.setattr(infer, "predict_slide", flaky)
    ok = predict_many(run, [slides["a"], slides["c"]], tmp_path / "retry", SETTINGS, workers=2, processes=False, retries=1)
    assert [r.status for r in ok] == ["done", "done"] and calls["a.png"] == 2 and calls["c.jpg"] == 1

    calls.clear()
    failed = predict_many(run, [slides["a"]], tmp_path / "no-retry", SETTINGS, workers=1, processes=False, retries=0)[0]
    assert failed.status == "failed" and "OSError: stale NFS file handle" in failed.error and calls["a.png"] == 1


def test_cli_predict_many_with_worker_processes(inputs, tmp_path, capsys):
    run, slides = inputs
    listing = tmp_path / "more.txt"
    listing.write_text(f"# extra slides\n\n{slides['c']}\nmissing-slide.svs\n", encoding="utf-8")
    out = tmp_path / "cli-out"
    argv = ["predict-many", str(run), str(slides["a"].parent), str(listing), "--out", str(out), "--workers", "2",
            "--retries", "1", "--tile", "128", "--overlap", "16", "--batch-size", "4", "--device", "cpu"]
    assert main(argv) == 1  # some slides failed
    captured = capsys.readouterr()
    table = captured.out[captured.out.index("slide "):]
    for name in ("a.png", "b.tif", "c.jpg"):
        assert any(line.startswith(name) and " done " in line for line in table.splitlines()), table
        assert open_label_pyramid(output_path(slides["a"].parent / name, out)).complete
    assert any(line.startswith("d_corrupt.tif") and " failed " in line for line in table.splitlines())
    assert any(line.startswith("missing-slide.svs") and "no such file" in line for line in table.splitlines())
    assert str(tmp_path / "missing-slide.svs") in captured.out  # relative list entries resolve next to the list
    assert "3 done, 0 skipped (already complete), 2 failed" in captured.out
    assert "2 slide(s) failed" in captured.err


def test_bad_inputs_fail_before_any_work(inputs, tmp_path, capsys):
    run, slides = inputs
    with pytest.raises(HistoWSSSError, match="both be written to"):
        plan_jobs([slides["a"], tmp_path / "elsewhere" / "a.png"], tmp_path / "out")
    assert [j.out.name for j in plan_jobs([slides["b"], tmp_path / "x.ome.tiff", slides["b"]], tmp_path)] == \
        ["b.ome.zarr", "x.ome.zarr"]
    with pytest.raises(HistoWSSSError, match="no segmenter checkpoint"):
        predict_many(tmp_path / "not-a-run", [slides["a"]], tmp_path / "out", SETTINGS, workers=1, processes=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict-many", str(run), str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no slide files in this folder" in capsys.readouterr().err


def test_a_running_scheduler_is_used_by_address(inputs, tmp_path):
    from distributed import LocalCluster

    run, slides = inputs
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      name="external") as cluster:
        (worker,) = cluster.workers.values()
        res = predict_many(run, [slides["c"]], tmp_path / "ext", SETTINGS, scheduler=cluster.scheduler_address)[0]
    assert res.status == "done" and res.worker == str(worker.name)
    assert open_label_pyramid(res.out).complete
