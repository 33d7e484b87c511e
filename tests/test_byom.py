"""Bring your own model: one DenseNet-121 of the catalogue (seeded random weights) saved as
safetensors, traced to TorchScript and exported to ONNX, imported with its card each way, gives
the torch eager model's probabilities and CAM boxes for the shared chest X-rays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dicom_node.errors import ModelError
from dicom_node.inference.byom import import_model
from dicom_node.inference.classify import classify_batch
from dicom_node.inference.localization import boxes_from_cams
from dicom_node.inference.models import load_bundle
from dicom_node.inference.networks import as_cam_network
from dicom_node.inference.preprocess import PreparedImage, prepare
from dicom_node.inference.registry import read_registry, verify
from dicom_node.inference.runtimes import OnnxRuntime, TorchRuntime
from dicom_node.results import Box
from tests.byom_support import ENTRY, model_settings, seeded_densenet, with_model, write_card

BOX_THRESHOLD = 0.6


@pytest.fixture(scope="module")
def images(shared_data: Path) -> list[PreparedImage]:
    return [
        prepare(p, resolution=224) for p in sorted((shared_data / "dicom" / "cxr").glob("*.dcm"))
    ]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the seeded network imported as safetensors (``site-st``),
    TorchScript (``site-ts``) and its ONNX export (``site-onnx``)."""
    from dicom_node.inference.export import export_onnx

    root = tmp_path_factory.mktemp("byom")
    models_dir = root / "models"
    network = seeded_densenet()
    save_file(network.state_dict(), str(root / "weights.safetensors"))
    import_model(
        models_dir,
        "site-st",
        root / "weights.safetensors",
        write_card(root / "st.toml", "safetensors"),
    )
    torch.jit.trace(network, torch.zeros(1, 1, 224, 224)).save(str(root / "traced.pt"))
    card = write_card(root / "ts.toml", "torchscript")
    import_model(models_dir, "site-ts", root / "traced.pt", card, allow_torchscript=True)
    export = export_onnx(model_settings(root, models_dir, "site-st"), "site-st", root / "m.onnx")
    assert export.max_difference <= 1e-4 and export.heatmaps
    import_model(models_dir, "site-onnx", export.model, export.card)
    return models_dir


def _eager(images: list[PreparedImage]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the catalogue architecture run eagerly on torch, CAM from its head."""
    cam = as_cam_network("densenet121", seeded_densenet())
    runtime = TorchRuntime(cam.feature_map, cam.head, torch.device("cpu"))
    probabilities, cams = runtime.run(np.stack([image.pixels for image in images]))
    assert cams is not None
    return probabilities, cams


def _iou(a: Box, b: Box) -> float:
    ix = max(0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
    area = lambda box: (box.x1 - box.x0) * (box.y1 - box.y0)  # noqa: E731
    return ix * iy / (area(a) + area(b) - ix * iy)


@pytest.mark.parametrize(
    ("name", "runtime_type"),
    [("site-st", TorchRuntime), ("site-ts", TorchRuntime), ("site-onnx", OnnxRuntime)],
)
def test_imported_model_gives_the_eager_models_probabilities_and_cam_boxes(
    site: Path, images: list[PreparedImage], tmp_path: Path, name: str, runtime_type: type
) -> None:
    expected, expected_cams = _eager(images)
    # The reference must be able to tell models apart: spread probabilities, not 0 / 1.
    assert 0.05 < float(np.mean((expected > 0.01) & (expected < 0.99))), expected
    settings = model_settings(tmp_path, site, name, allow_torchscript=name == "site-ts")
    bundle = load_bundle(settings)
    assert isinstance(bundle.runtime, runtime_type) and bundle.runtime.heatmaps
    assert bundle.weights_status == "verified" and bundle.card.card_sha256
    scores = classify_batch(bundle, np.stack([image.pixels for image in images]))
    probabilities = np.stack([s.probabilities for s in scores])
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-4)
    compared = 0
    for index, (image, score) in enumerate(zip(images, scores, strict=True)):
        assert score.cams is not None
        ours = boxes_from_cams(score.cams, image.geometry, BOX_THRESHOLD)
        reference = boxes_from_cams(expected_cams[index], image.geometry, BOX_THRESHOLD)
        for label_boxes, label_reference in zip(ours, reference, strict=True):
            assert len(label_boxes) == len(label_reference)
            for box, other in zip(label_boxes, label_reference, strict=True):
                assert _iou(box, other) >= 0.95, (name, box, other)
                compared += 1
    assert compared >= len(images) * len(ENTRY.labels)


def test_torchscript_model_does_not_load_unless_allowed(site: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="allow_torchscript = true"):
        load_bundle(model_settings(tmp_path, site, "site-ts"))


def test_runtime_choice_auto_torch_and_onnxruntime(site: Path, tmp_path: Path) -> None:
    settings = model_settings(tmp_path, site, "site-onnx", threads=2)
    assert load_bundle(settings).runtime.kind == "onnxruntime"
    assert load_bundle(with_model(settings, runtime="onnxruntime")).runtime.kind == "onnxruntime"
    with pytest.raises(ModelError, match="cannot run site-onnx, an ONNX model"):
        load_bundle(with_model(settings, runtime="torch"))
    st = with_model(settings, name="site-st", runtime="onnxruntime")
    with pytest.raises(ModelError, match="models export site-st --format onnx"):
        load_bundle(st)
    assert load_bundle(with_model(st, runtime="auto")).runtime.kind == "torch"


def test_verify_names_an_edited_card_and_the_model_then_refuses_to_load(
    site: Path, tmp_path: Path
) -> None:
    import shutil

    models_dir = tmp_path / "models"
    shutil.copytree(site, models_dir)
    assert all(ok for _, ok, _ in verify(models_dir))
    card = models_dir / "site-onnx" / "model.toml"
    card.write_text(card.read_text().replace("Atelectasis = 0.07422872", "Atelectasis = 0.5"))
    results = {name: (ok, message) for name, ok, message in verify(models_dir)}
    assert results["site-onnx"] == (
        False,
        "site-onnx/model.toml does not match its recorded SHA-256 (edited?)",
    )
    assert results["site-st"][0]
    with pytest.raises(ModelError, match="model.toml does not match its recorded SHA-256"):
        load_bundle(model_settings(tmp_path, models_dir, "site-onnx"))


def test_registry_records_format_and_card_hash_and_reimport_of_another_file_is_refused(
    site: Path, tmp_path: Path
) -> None:
    record = read_registry(site)["site-onnx"]
    assert (record.format, record.file, record.card) == (
        "onnx",
        "site-onnx/model.onnx",
        "site-onnx/model.toml",
    )
    raw = json.loads((site / "registry.json").read_text())["models"]["site-onnx"]
    assert raw["card_sha256"] == record.card_sha256 and len(record.card_sha256) == 64
    other = tmp_path / "other.safetensors"
    save_file(seeded_densenet(seed=7).state_dict(), str(other))
    with pytest.raises(ModelError, match="import this one under a new name"):
        import_model(site, "site-st", other, write_card(tmp_path / "c.toml", "safetensors"))


def test_verified_torchxrayvision_model_exports_to_onnx_with_parity_and_untrained_does_not(
    tmp_path: Path, release_file: Path, images: list[PreparedImage]
) -> None:
    from dicom_node.inference.export import export_onnx
    from dicom_node.inference.registry import install

    models_dir = tmp_path / "models"
    settings = model_settings(tmp_path, models_dir, ENTRY.name, allow_untrained=True)
    with pytest.raises(ModelError, match="no weights installed"):
        export_onnx(settings, ENTRY.name, tmp_path / "untrained.onnx")
    assert not (tmp_path / "untrained.onnx").exists()
    install(models_dir, ENTRY.name, release_file, "test")
    export = export_onnx(settings, ENTRY.name, tmp_path / "xrv.onnx")
    assert export.max_difference <= 1e-4
    with pytest.raises(ModelError, match="exists; export to a new path"):
        export_onnx(settings, ENTRY.name, tmp_path / "xrv.onnx")
    assert export.model.is_file() and export.card.is_file()  # the refusal removed nothing
    import_model(models_dir, "xrv-onnx", export.model, export.card)
    pixels = np.stack([image.pixels for image in images])
    ours = classify_batch(load_bundle(with_model(settings, name="xrv-onnx")), pixels)
    eager = classify_batch(load_bundle(settings), pixels)
    for a, b in zip(ours, eager, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-4)


def test_three_channel_mean_std_model_sees_the_card_recipe(
    tmp_path: Path, images: list[PreparedImage]
) -> None:
    from dicom_node.inference.networks import build_architecture

    torch.manual_seed(3)
    network = build_architecture("densenet121", len(ENTRY.labels), channels=3).eval()
    save_file(network.state_dict(), str(tmp_path / "rgb.safetensors"))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    card = write_card(
        tmp_path / "rgb.toml",
        "safetensors",
        input={"size": 224, "channels": 3},
        preprocessing={"recipe": "mean-std", "mean": mean, "std": std},
    )
    import_model(tmp_path / "models", "site-rgb", tmp_path / "rgb.safetensors", card)
    bundle = load_bundle(model_settings(tmp_path, tmp_path / "models", "site-rgb"))
    pixels = np.stack([image.pixels for image in images])
    unit = np.repeat((pixels + 1024) / 2048, 3, axis=1)
    normalised = (unit - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    cam = as_cam_network("densenet121", network)
    expected, _ = TorchRuntime(cam.feature_map, cam.head, torch.device("cpu")).run(
        normalised.astype(np.float32)
    )
    scores = classify_batch(bundle, pixels)
    np.testing.assert_allclose(np.stack([s.probabilities for s in scores]), expected, atol=1e-5)
    with pytest.raises(ModelError, match="input channel"):  # a 1-channel card for RGB weights
        import_model(
            tmp_path / "models",
            "site-grey",
            tmp_path / "rgb.safetensors",
            write_card(tmp_path / "grey.toml", "safetensors"),
        )
