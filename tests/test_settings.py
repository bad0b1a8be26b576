"""One source of settings (core.settings): the core's dataclass fields carry help, range and
choices, and the command line and the napari panels are generated from them.

* the defaults of the core, of ``train-cls``/``train-seg``/``cams``/``predict-many``/
  ``pseudo-masks`` (parsed back from what ``--help`` shows) and of the Training/Segmenter panels'
  forms (real widgets, the Segmenter's prediction form included) are equal, field by field; the
  Review panel's fields hold the core's defaults;
* the advanced rows of a generated form share the basic rows' label column;
* validation of types, ranges and choices is one line naming the setting and the value, for
  both stages alike (the segmenter's used to skip half of its settings);
* ``saved()`` is the one reader of a run's config.json (a damaged file is one line naming it)
  and ``check_resume`` the one resume rule (a setting an older run does not record is ignored).
Run: xvfb-run -a python -m pytest tests/test_settings.py -q
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from test_train import make_dataset  # the generated WSSS4LUAD-style folder of the training tests
from test_train_seg import stage_one  # noqa: F401 - the tiny real stage-one run (module fixture)
from test_training_safety import seg_tiny

from napari_histo_wsss.cli import build_parser, main
from napari_histo_wsss.cli._settings import option_name, settings_from_args
from napari_histo_wsss.cli.stage1 import _config
from napari_histo_wsss.cli.stage2 import _seg_config
from napari_histo_wsss.core.errors import HistoWSSSError, TrainingError
from napari_histo_wsss.core.review import ReviewSettings
from napari_histo_wsss.core.settings import format_value
from napari_histo_wsss.core.stage1.cams import PseudoMaskSettings
from napari_histo_wsss.core.stage1.train import TrainConfig, load_run
from napari_histo_wsss.core.stage2.batch import PredictSettings
from napari_histo_wsss.core.stage2.train import SegConfig

CLASSES = [(TrainConfig, "train-cls", ["DATASET", "RUN"], "Training"),
           (SegConfig, "train-seg", ["RUN"], "Segmenter")]
#: settings classes with a command but no generated panel of their own
CLI_CLASSES = [(ReviewSettings, "cams", ["PROJECT"]),
               (PredictSettings, "predict-many", ["RUN", "SLIDE", "--out", "OUT"]),
               (PseudoMaskSettings, "pseudo-masks", ["RUN", "IMAGES", "OUT"])]


def test_predict_takes_its_options_from_the_prediction_settings():
    """`predict` and `predict-many` share PredictSettings: same defaults, same option names (only
    predict-many's own --overwrite/--torch-threads are not predict's)."""
    argv = ["predict", "RUN", "IN", "OUT"]
    assert settings_from_args(PredictSettings, build_parser().parse_args(argv)) == PredictSettings()
    args = build_parser().parse_args([*argv, "--tile", "256", "--checkpoint", "last", "--tta", "--batch-size", "2"])
    got = settings_from_args(PredictSettings, args)
    assert (got.tile, got.which, got.tta, got.batch_size, got.overlap) == (256, "last", True, 2, PredictSettings().overlap)
    assert args.overwrite is False and not hasattr(args, "torch_threads")


def cli_value(command: list[str], f: dataclasses.Field, text: str | None) -> object:
    """The value of setting field ``f`` that the command line parses from ``--name text`` (a flag
    when ``text`` is None)."""
    opt = option_name(f.name, f.metadata["setting"])
    argv = [*command, opt] if text is None else [*command, opt, text]
    args = build_parser().parse_args(argv)
    return getattr(args, f.name)


# ---------------------------------------------------------------------------------------------
# defaults: core == CLI == GUI
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_class,command,positional", [c[:3] for c in CLASSES] + CLI_CLASSES,
                         ids=["stage1", "stage2", "cams", "predict-many", "pseudo-masks"])
def test_cli_defaults_are_the_core_defaults(config_class, command, positional):
    core = config_class()
    # nothing given: the core's defaults, every field
    args = build_parser().parse_args([command, *positional])
    assert settings_from_args(config_class, args) == core
    parser = build_parser()
    parser.parse_args([command, *positional])  # the options are added when the subcommand is used
    sub = parser._subparsers._group_actions[0].choices[command]
    helps = {opt: a.help for a in sub._actions for opt in a.option_strings}
    helptext = sub.format_help()
    for f in config_class.settings_fields():
        info = f.metadata["setting"]
        if not info.cli:
            continue
        opt, default = option_name(f.name, info), getattr(core, f.name)
        assert opt in helps and opt in helptext, f"{opt} missing from {command} --help"
        shown = helps[opt].split("(default: ", 1)[1].split(")", 1)[0]
        if isinstance(default, bool):  # --name / --no-name; --help shows on/off
            assert shown == ("on" if default else "off"), f.name
            for flag, value in ((opt, True), (f"--no-{opt[2:]}", False)):
                assert getattr(build_parser().parse_args([command, *positional, flag]), f.name) is value
            continue
        if "(default:" not in info.help:
            assert shown == (format_value(default) or info.none or "none"), f.name
            # what --help shows as the default parses back to the core's default
            assert cli_value([command, *positional], f, shown) == default, f.name
        assert cli_value([command, *positional], f, format_value(default) or "none") == default, f.name


def test_cli_parser_waits_for_the_training_modules():
    """The options come from the training modules (torch) only when train-cls/train-seg parse:
    ``histo-wsss info`` or ``--help`` do not pay for it."""
    code = ("import sys; from napari_histo_wsss.cli import build_parser; p = build_parser(); "
            "print('napari_histo_wsss.core.stage1.train' in sys.modules, 'torch' in sys.modules); "
            "p.parse_args(['train-cls', 'D', 'R', '--epochs', '2']); print('napari_histo_wsss.core.stage1.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-3:] == ["False", "False", "True"]


def test_cli_no_flags_and_resume_keep_saved_settings(tmp_path):
    args = build_parser().parse_args(["train-cls", "d", str(tmp_path), "--no-amp", "--no-augment", "--pda"])
    cfg = _config(args)
    assert (cfg.amp, cfg.augment, cfg.pda) == (False, False, True)
    # --resume: the saved settings, changed only where an option is given (also to a default value)
    saved = TrainConfig(method="segmix", epochs=2, lr=1e-3, amp=False, segmix_tiles=(32, 16))
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    args = build_parser().parse_args(["train-cls", "d", str(tmp_path), "--resume", "--epochs", "3", "--amp"])
    assert _config(args) == dataclasses.replace(saved, epochs=3, amp=True)
    seg = tmp_path / "seg"
    seg.mkdir()
    saved2 = SegConfig(epochs=1, synthesis=("mosaic",), batch_size=4)
    (seg / "config.json").write_text(json.dumps({**saved2.to_dict(), "stage_one": "x", "dataset": "y",
                                                 "supervision_source": "z"}))
    args = build_parser().parse_args(["train-seg", "RUN", "--out", str(seg), "--resume", "--epochs", "8"])
    assert _seg_config(args) == dataclasses.replace(saved2, epochs=8)
    args = build_parser().parse_args(["train-seg", "RUN", "--full-supervision", "--synthesis", "Mosaic,bezier"])
    assert (_seg_config(args).supervision, _seg_config(args).synthesis) == ("full", ("mosaic", "bezier"))


def test_panel_forms_show_the_core_defaults(make_napari_viewer):
    """The Training and Segmenter panels, docked as the plugin does: every form field holds the
    core default, and the config a panel builds without a project is the core's config. The
    Review panel's CAM type is the core's default (the run's cam_mode)."""
    viewer = make_napari_viewer()
    for config_class, _command, _positional, panel in CLASSES:
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-histo-wsss", panel)
        core = config_class()
        form = widget.settings.values()
        expected = {f.name for f in config_class.settings_fields() if f.metadata["setting"].gui}
        assert set(form) == expected
        for name, value in form.items():
            assert value == getattr(core, name), f"{panel} panel: {name} shows {value!r}, core {getattr(core, name)!r}"
        assert widget.config() == core
        # the less common settings are there, but folded away
        assert not widget.settings.advanced.isVisibleTo(widget)
        widget.settings.show_advanced(True)
        assert widget.settings.advanced.isVisibleTo(widget)
        basic = [f.name for f in config_class.settings_fields() if f.metadata["setting"].basic]
        assert all(widget.settings.widgets[n].parent() is widget.settings.box for n in basic)
    # the Segmenter panel's prediction form is PredictSettings'
    seg = widget
    predict = PredictSettings()
    expected = {f.name for f in PredictSettings.settings_fields() if f.metadata["setting"].gui}
    assert set(seg.pred_settings.values()) == expected == {"tile", "overlap", "tta", "gate"}
    for name, value in seg.pred_settings.values().items():
        assert value == getattr(predict, name), f"prediction form: {name} shows {value!r}"
    # the Review panel's form is ReviewSettings' (the thresholds are live sliders holding its defaults)
    _dock, review = viewer.window.add_plugin_dock_widget("napari-histo-wsss", "Review and correct")
    d = ReviewSettings()
    form = review.settings_form.values()
    assert set(form) == {"which", "mode", "rule", "refine", "tile", "max_side", "device"} and form["rule"] == "raw"
    assert form["refine"] == "crf"
    assert ReviewSettings(**form) == d and form["mode"] is None
    assert review.mode.currentText() == "as trained"
    review.mode.setCurrentText("last")
    assert review.settings_form.values()["mode"] == "last"
    review.mode.setCurrentText("as trained")
    assert (review.cam_threshold, review.white.value()) == (d.cam_threshold, d.white_level)
    assert settings_from_args(ReviewSettings, build_parser().parse_args(["cams", "P"])) == d


def test_review_cam_modes_are_the_models():
    """ReviewSettings names the CAM types itself (core.review does not import torch)."""
    from napari_histo_wsss.core.models.classifier import CAM_MODES

    info = dict((f.name, f.metadata["setting"]) for f in ReviewSettings.settings_fields())["mode"]
    assert sorted(info.choices) == sorted(CAM_MODES)
    with pytest.raises(HistoWSSSError, match=r"^review setting: mode must be one of multi, last, got 'nope'$"):
        ReviewSettings(mode="nope").validate()
    with pytest.raises(SystemExit):  # the command line refuses it too (and takes none as the run's own)
        build_parser().parse_args(["cams", "P", "--mode", "nope"])


@pytest.mark.parametrize("config_class", [TrainConfig, SegConfig], ids=["stage1", "stage2"])
def test_advanced_labels_line_up_with_the_basic_ones(config_class, qtbot):
    """One label column: the advanced rows (a second form in a scroll area) start their fields
    where the basic rows do, also under napari's stylesheet (applied after the form is built, as
    when a panel is docked; it widens the labels). Without the shared width the two columns were
    6 px apart on the left and up to 24 px on the right."""
    from napari.qt import get_stylesheet
    from qtpy.QtCore import QPoint

    from napari_histo_wsss.widgets._common import SettingsForm

    form = SettingsForm(config_class)
    qtbot.addWidget(form)
    form.setStyleSheet(get_stylesheet("dark"))
    form.show_advanced(True)
    form.resize(420, 900)
    form.show()
    qtbot.waitExposed(form)
    basic = [lbl for lbl in form.labels() if form.box.isAncestorOf(lbl) and not form.advanced.isAncestorOf(lbl)]
    advanced = [lbl for lbl in form.labels() if form.advanced.isAncestorOf(lbl)]
    assert basic and advanced
    lefts = [lbl.mapTo(form, QPoint(0, 0)).x() for lbl in basic + advanced]
    rights = [lbl.mapTo(form, QPoint(lbl.width(), 0)).x() for lbl in basic + advanced]
    # the scroll area's frame may shift the advanced rows by a pixel
    assert max(lefts) - min(lefts) <= 1 and max(rights) - min(rights) <= 1, (lefts, rights)


def test_panel_list_field_with_bad_text_is_one_line(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, tr = viewer.window.add_plugin_dock_widget("napari-histo-wsss", "Training")
    tr.segmix_shares.setText("0.25, half")
    with pytest.raises(HistoWSSSError) as e:
        tr.config()
    assert str(e.value) == "SegMix shares: expected comma-separated numbers, got '0.25, half'"
    tr.segmix_shares.setText("0.25,1.5")
    with pytest.raises(TrainingError, match=r"^training setting: segmix_shares entries must lie in \(0, 1\], "
                                            r"got \[0.25, 1.5\]$"):
        tr.config()
    tr.segmix_shares.setText("")  # emptied: at least one share
    with pytest.raises(TrainingError, match="segmix_shares must hold at least 1 value"):
        tr.config()
    tr.segmix_tiles.setText("")  # optional: empty = automatic
    tr.segmix_shares.setText("0.5")
    assert tr.config().segmix_tiles is None and tr.config().segmix_shares == (0.5,)


# ---------------------------------------------------------------------------------------------
# validation: one rule set, one message style
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_class,changes,message", [
    (TrainConfig, dict(epochs=0), "training setting: epochs must be >= 1, got 0"),
    (TrainConfig, dict(lr=float("nan")), "training setting: lr must be a finite number, got nan"),
    (TrainConfig, dict(lr=0.0), "training setting: lr must be > 0, got 0.0"),
    (TrainConfig, dict(epochs="8"), "training setting: epochs must be a whole number, got '8'"),
    (TrainConfig, dict(method="mixup"), "training setting: method must be one of cam, segmix, got 'mixup'"),
    (TrainConfig, dict(val_fraction=1.0), "training setting: val_fraction must lie in [0, 1), got 1.0"),
    (TrainConfig, dict(cam_weights=(0, 0, 0)), "training setting: cam_weights must have a positive sum, got [0.0, 0.0, 0.0]"),
    (TrainConfig, dict(cam_weights=(1, 2)), "training setting: cam_weights must be 3 values, got [1.0, 2.0]"),
    (TrainConfig, dict(backbone="resnet99"), "training setting: backbone must be one of efficientnet-lite0, "
                                              "efficientnet-lite1, efficientnet-lite2, resnet18, resnet34, resnet50, "
                                              "got 'resnet99'"),
    (TrainConfig, dict(output_stride=12), "training setting: output_stride must be one of 8, 16, 32, got 12"),
    # the segmenter's checks used to stop at half of its settings: these passed before
    (SegConfig, dict(weight_decay=-0.1), "segmenter setting: weight_decay must be >= 0, got -0.1"),
    (SegConfig, dict(head_lr_mult=0.0), "segmenter setting: head_lr_mult must be > 0, got 0.0"),
    (SegConfig, dict(warmup_steps=-1), "segmenter setting: warmup_steps must be >= 0, got -1"),
    (SegConfig, dict(consistency_weight=-1.0), "segmenter setting: consistency_weight must be >= 0, got -1.0"),
    (SegConfig, dict(image_loss_weight=-1.0), "segmenter setting: image_loss_weight must be >= 0, got -1.0"),
    (SegConfig, dict(filter_steps=0), "segmenter setting: filter_steps must be >= 1, got 0"),
    (SegConfig, dict(output_stride=4), "segmenter setting: output_stride must be one of 8, 16, 32, got 4"),
    (SegConfig, dict(backbone="vgg"), "segmenter setting: backbone must be one of efficientnet-lite0, "
                                       "efficientnet-lite1, efficientnet-lite2, resnet18, resnet34, resnet50, got 'vgg'"),
    (SegConfig, dict(synthesis=("cutmix",)), "segmenter setting: synthesis entries must be one of mosaic, bezier, "
                                              "got ['cutmix']"),
])
def test_validation_is_one_line_naming_setting_rule_and_value(config_class, changes, message):
    with pytest.raises(TrainingError) as e:
        config_class(**changes).validate()
    assert str(e.value) == message


def test_old_backbone_spellings_and_optional_values_stay_valid():
    TrainConfig(backbone="EfficientNet_Lite0", patch_size=None, segmix_tiles=None).validate()
    SegConfig(backbone=" resnet18 ", max_steps_per_epoch=None).validate()


# ---------------------------------------------------------------------------------------------
# config.json and the resume rule
# ---------------------------------------------------------------------------------------------
def test_saved_is_one_reader_for_both_stages(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(method="segmix", lr=1e-3, segmix_tiles=(32, 16))
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.saved(run) == cfg
    for text, why in (("{not json", "unreadable run config"), ("[1, 2]", "a JSON list instead of an object"),
                      (json.dumps({**cfg.to_dict(), "colour": 1}), r"unknown training setting\(s\) colour"),
                      (json.dumps({**cfg.to_dict(), "lr": -1}), "training setting: lr must be > 0, got -1")):
        (run / "config.json").write_text(text)
        with pytest.raises(TrainingError, match=f"^{run / 'config.json'}: .*{why}") as e:
            TrainConfig.saved(run)
        assert "\n" not in str(e.value)
    # load_run reads stage one's settings through it
    (run / "config.json").write_text("{not json")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(TrainingError, match=f"^{run / 'config.json'}: unreadable run config"):
        load_run(run, "last")
    # stage two: the records beside the settings are not settings; anything else unknown is refused
    seg = tmp_path / "seg"
    seg.mkdir()
    scfg = SegConfig(epochs=3, synthesis=("bezier",))
    (seg / "config.json").write_text(json.dumps({**scfg.to_dict(), "stage_one": "/r", "dataset": "/d",
                                                 "supervision_source": "s"}))
    assert SegConfig.saved(seg) == scfg
    (seg / "config.json").write_text(json.dumps({**scfg.to_dict(), "stage_one": "/r", "wobble": 2}))
    with pytest.raises(TrainingError, match=r"unknown segmenter setting\(s\) wobble"):
        SegConfig.saved(seg)
    with pytest.raises(TrainingError, match="no run config there"):
        SegConfig.saved(tmp_path / "nowhere")


def test_damaged_config_on_resume_is_one_line_in_cli_and_panel(tmp_path, capsys, make_napari_viewer):
    data = make_dataset(tmp_path / "ds", n_val=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"epochs": 2, "lr": ')
    assert main(["train-cls", str(data), str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"histo-wsss train-cls: error: {run / 'config.json'}: unreadable run config: "
                   f"Expecting value: line 1 column 21 (char 20)"]
    viewer = make_napari_viewer()
    _dock, tr = viewer.window.add_plugin_dock_widget("napari-histo-wsss", "Training")
    with pytest.raises(TrainingError, match=f"^{run / 'config.json'}: unreadable run config"):
        tr._load_run_config(run)


def test_stage_two_resumes_a_checkpoint_of_an_older_version(stage_one, tmp_path):  # noqa: F811
    """A segmenter checkpoint whose config lacks settings added since (an older version) resumes
    as stage one's does; stage two used to count each missing setting as a change and refuse."""
    import torch

    from napari_histo_wsss.core.stage2.train import train_segmenter

    run, patches, out = stage_one / "run", stage_one / "patches", tmp_path / "seg"
    assert list(train_segmenter(run, config=seg_tiny(epochs=1), dataset=patches, out_dir=out))[-1].kind == "done"
    last = out / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    for key in ("image_loss_weight", "synthesis_keep", "filter_steps"):
        del ckpt["meta"]["config"][key]
    torch.save(ckpt, last)
    events = list(train_segmenter(run, config=seg_tiny(epochs=2), dataset=patches, out_dir=out, resume=True))
    assert events[-1].kind == "done" and sum(e.kind == "epoch" for e in events) == 1


@pytest.mark.parametrize("config_class", [TrainConfig, SegConfig], ids=["stage1", "stage2"])
def test_resume_rule_is_the_same_for_both_stages(config_class, tmp_path):
    """What both training loops call on a resume (engine.TrainingTask.check_resume)."""
    cfg = config_class()
    saved = cfg.to_dict()
    where = tmp_path / "last.pt"
    # a setting an older run does not record is not a change (stage two used to refuse these)
    older = {k: v for k, v in saved.items() if k not in ("warmup_steps", "augment")}
    dataclasses.replace(cfg, warmup_steps=5).check_resume(older, where)
    # resumable settings may change
    dataclasses.replace(cfg, epochs=cfg.epochs + 3, device="cpu", amp=False, val_max_images=2).check_resume(saved, where)
    assert config_class.resumable() == {"epochs", "device", "amp", "num_workers", "val_max_images"}
    # others may not: the message names the setting, the saved and the current value
    with pytest.raises(TrainingError) as e:
        dataclasses.replace(cfg, lr=0.5, seed=3).check_resume(saved, where)
    assert str(e.value) == (f"{where}: cannot resume with different settings (lr: saved 0.0003 vs now 0.5, "
                            f"seed: saved 0 vs now 3); only amp, device, epochs, num_workers, val_max_images "
                            "may change. Start a new run folder instead")
