"""Model cards and the files they describe: a wrong card or file is refused with one line
naming the key or the problem, and a pickle in disguise never runs."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from dicom_node.errors import ModelError
from dicom_node.inference.byom import import_model
from dicom_node.inference.card import catalogue_card, catalogue_card_text, parse_card
from dicom_node.inference.catalogue import CATALOGUE
from tests.byom_support import card_text, seeded_densenet, write_card


def _refusal(text: str) -> str:
    with pytest.raises(ModelError) as caught:
        parse_card(text, "site")
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"format": "pickle"}, "format = 'pickle' is not one of onnx, safetensors"),
        ({"intended_use": None}, "missing key 'intended_use'"),
        ({"thresholds": {"Atelectasis": 0.5}}, "missing key 'thresholds.Consolidation'"),
        ({"input": {"size": 10, "channels": 1}}, "input.size = 10 must be an integer"),
        ({"input": {"size": 224, "channels": 2}}, "input.channels = 2 must be 1 or 3"),
        ({"input": {"size": 224, "channels": True}}, "input.channels = True must be 1 or 3"),
        ({"architecture": "vgg16"}, "architecture = 'vgg16' is not one of densenet121"),
        ({"colour": "blue"}, "unknown key 'colour'"),
        (
            {"preprocessing": {"recipe": "mean-std", "mean": [0.5]}},
            "preprocessing.std must list 1 number(s)",
        ),
        ({"labels": ["A", "A"], "thresholds": {"A": 0.5}}, "labels lists 'A' twice"),
        ({"weights_sha256": "abc"}, "weights_sha256 must be 64 hexadecimal digits"),
    ],
)
def test_wrong_card_is_refused_with_one_line_naming_the_key(
    changes: dict[str, Any], expected: str
) -> None:
    assert expected in _refusal(card_text("safetensors", **changes))


def test_safetensors_card_without_architecture_is_refused() -> None:
    assert "missing key 'architecture' (safetensors needs one)" in _refusal(
        card_text("safetensors", architecture=None)
    )


def test_card_hash_is_the_sha256_of_its_bytes_and_changes_with_any_edit() -> None:
    text = card_text("onnx")
    first, edited = parse_card(text, "a"), parse_card(text.replace("site-1", "site-2"), "a")
    assert len(first.card_sha256) == 64 and first.card_sha256 != edited.card_sha256


def test_every_catalogue_model_has_a_valid_card_with_its_thresholds() -> None:
    for name, entry in CATALOGUE.items():
        card = parse_card(catalogue_card_text(entry), name)
        assert card.op_thresholds == entry.op_thresholds and card.labels == entry.labels
        assert card.card_sha256 == catalogue_card(entry).card_sha256


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain ONNX classifier (image -> scores, 18 outputs, 224 px), no CAM output."""
    path = tmp_path_factory.mktemp("onnx") / "plain.onnx"
    torch.onnx.export(
        seeded_densenet(),
        (torch.zeros(1, 1, 224, 224),),
        str(path),
        input_names=["image"],
        output_names=["scores"],
        dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"labels": ["A", "B"], "thresholds": {"A": 0.5, "B": 0.5}},
            "output 'scores' has shape ['batch', 18], the card lists 2 labels",
        ),
        (
            {"input": {"size": 256, "channels": 1}},
            "input 'image' has shape ['batch', 1, 224, 224], the card says [N, 1, 256, 256]",
        ),
        ({"output": {"name": "logits"}}, "the card's output.name 'logits' is not an output"),
        (
            {"heatmap": {"features": "features", "weight": "fc.weight"}},
            "heatmap.features 'features' is not a graph output",
        ),
    ],
)
def test_onnx_file_that_does_not_match_its_card_is_refused(
    onnx_file: Path, tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    card = write_card(tmp_path / "card.toml", "onnx", **changes)
    with pytest.raises(ModelError) as caught:
        import_model(tmp_path / "models", "site", onnx_file, card)
    assert expected in str(caught.value).replace("None", "'batch'")
    assert not (tmp_path / "models" / "site").exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("extra", "unexpected key 'extra.weight'"),
        ("missing", "missing key 'classifier.bias'"),
        ("shape", "key 'classifier.weight' has shape (17, 1024), not (18, 1024)"),
    ],
)
def test_safetensors_with_an_extra_missing_or_wrong_key_is_refused_naming_it(
    tmp_path: Path, edit: str, expected: str
) -> None:
    state = seeded_densenet().state_dict()
    if edit == "extra":
        state["extra.weight"] = torch.zeros(3)
    elif edit == "missing":
        del state["classifier.bias"]
    else:
        state["classifier.weight"] = torch.zeros(17, 1024)
    save_file(state, str(tmp_path / "w.safetensors"))
    card = write_card(tmp_path / "card.toml", "safetensors")
    with pytest.raises(ModelError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        import_model(tmp_path / "models", "site", tmp_path / "w.safetensors", card)


def test_torchscript_is_refused_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "traced.pt"
    torch.jit.trace(seeded_densenet(), torch.zeros(1, 1, 224, 224)).save(str(path))
    card = write_card(tmp_path / "card.toml", "torchscript")
    with pytest.raises(ModelError, match="TorchScript interpreter runs; it is refused unless"):
        import_model(tmp_path / "models", "site", path, card)
    assert import_model(tmp_path / "models", "site", path, card, allow_torchscript=True)


def test_torchscript_heatmap_that_does_not_reproduce_the_output_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "traced.pt"
    torch.jit.trace(seeded_densenet(), torch.zeros(1, 1, 224, 224)).save(str(path))
    wrong = {"features": "features", "classifier": "classifier", "relu": False}  # DenseNet: relu
    card = write_card(tmp_path / "card.toml", "torchscript", heatmap=wrong)
    with pytest.raises(ModelError, match="do not reproduce the model's output"):
        import_model(tmp_path / "models", "site", path, card, allow_torchscript=True)


class _Marker:
    """Unpickling this creates the marker file: what a hostile checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("card_format", ["onnx", "safetensors"])
def test_pickle_renamed_onnx_or_safetensors_is_refused_and_nothing_of_it_runs(
    tmp_path: Path, card_format: str
) -> None:
    marker = tmp_path / "marker"
    hostile = tmp_path / f"model.{card_format}"
    torch.save({"state": _Marker(marker)}, hostile)  # torch's zip-of-pickles checkpoint
    card = write_card(tmp_path / "card.toml", card_format)
    with pytest.raises(
        ModelError,
        match=f"is not an? {'ONNX model' if card_format == 'onnx' else 'safetensors file'}",
    ):
        import_model(tmp_path / "models", "site", hostile, card)
    assert not marker.exists()
    assert not (tmp_path / "models" / "site").exists()
    # The proof can fail: the same bytes, unpickled, do create the marker.
    shutil.copyfile(hostile, tmp_path / "copy.pt")
    torch.load(tmp_path / "copy.pt", weights_only=False)
    assert marker.exists()


def test_plain_pickle_renamed_onnx_is_refused_too(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    hostile = tmp_path / "model.onnx"
    hostile.write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(ModelError, match="is not an ONNX model|fails onnx.checker"):
        import_model(tmp_path / "models", "site", hostile, write_card(tmp_path / "c.toml", "onnx"))
    assert not marker.exists()
    pickle.loads(hostile.read_bytes())
    assert marker.exists()


def test_catalogue_names_and_unsafe_names_are_refused_for_card_models(tmp_path: Path) -> None:
    card = write_card(tmp_path / "card.toml", "onnx")
    for name, expected in (
        ("densenet121-res224-all", "is a catalogue model"),
        ("../escape", "use 1-64 letters"),
    ):
        with pytest.raises(ModelError, match=expected):
            import_model(tmp_path / "models", name, card, card)


def test_onnx_with_external_tensor_files_is_refused(onnx_file: Path, tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(onnx_file))
    external = tmp_path / "split.onnx"
    onnx.save_model(model, str(external), save_as_external_data=True, location="weights.bin")
    card = write_card(tmp_path / "card.toml", "onnx")
    with pytest.raises(ModelError, match="keeps tensors in external files"):
        import_model(tmp_path / "models", "site", external, card)
