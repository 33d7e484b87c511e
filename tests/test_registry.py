"""Model registry: pull from a loopback server, import, verify, and loading that runs no code."""

from __future__ import annotations

import http.server
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchxrayvision as xrv

from dicom_node.config.settings import ModelSettings, Settings, StorageSettings
from dicom_node.errors import ModelError
from dicom_node.inference.models import load_bundle
from dicom_node.inference.registry import install, pull, read_registry, verify
from tests.conftest import MODEL_NAME, make_release_file
from tests.helpers import free_port, run_cli


class _Server:
    """A static file server on 127.0.0.1 that can also cut a download short."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.truncate = folder, False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = server.folder / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if server.truncate else data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    folder = tmp_path / "www"
    folder.mkdir()
    instance = _Server(folder)
    yield instance
    instance.httpd.shutdown()


def test_pull_installs_and_records_sha256_on_first_use(
    server: _Server, release_file: Path, tmp_path: Path
) -> None:
    (server.folder / "model.pt").write_bytes(release_file.read_bytes())
    record = pull(tmp_path / "models", MODEL_NAME, url=f"{server.url}/model.pt", progress=False)
    assert record.trust == "trust-on-first-use"
    assert read_registry(tmp_path / "models")[MODEL_NAME].sha256 == record.sha256
    assert (tmp_path / "models" / record.file).read_bytes() == release_file.read_bytes()


def test_pull_of_a_file_whose_checksum_differs_from_the_recorded_one_is_refused(
    server: _Server, release_file: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    install(models, MODEL_NAME, release_file, "first")
    make_release_file(server.folder / "other.pt", seed=7)
    with pytest.raises(ModelError, match="differs from .* recorded"):
        pull(models, MODEL_NAME, url=f"{server.url}/other.pt", progress=False)
    assert verify(models) == [(MODEL_NAME, True, verify(models)[0][2])]


def test_truncated_download_installs_nothing(
    server: _Server, release_file: Path, tmp_path: Path
) -> None:
    (server.folder / "model.pt").write_bytes(release_file.read_bytes())
    server.truncate = True
    with pytest.raises(ModelError, match="truncated"):
        pull(tmp_path / "models", MODEL_NAME, url=f"{server.url}/model.pt", progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_pull_with_server_down_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "n.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path}"\n')
    result = run_cli(
        config, "models", "pull", MODEL_NAME, "--url", f"http://127.0.0.1:{free_port()}/model.pt"
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: download from http://127.0.0.1:")
    assert "Traceback" not in result.stderr


def test_import_refuses_a_file_that_would_run_code_and_names_the_class(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> Any:
            import os

            return (os.system, ("touch /tmp/dicom-node-pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"classifier.weight": Exploit()}, evil, pickle_module=pickle)
    with pytest.raises(ModelError, match="not on the allow-list.*system"):
        install(tmp_path / "models", MODEL_NAME, evil, "import")
    assert not Path("/tmp/dicom-node-pwned").exists()


def test_import_refuses_wrong_label_count(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save(xrv.models.DenseNet(num_classes=14), wrong)
    with pytest.raises(ModelError, match="not a densenet121 with 18 outputs"):
        install(tmp_path / "models", MODEL_NAME, wrong, "import")


def test_cli_import_list_and_verify_detects_corruption(tmp_path: Path, release_file: Path) -> None:
    config = tmp_path / "n.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path}"\n')
    imported = run_cli(config, "models", "import", str(release_file), "--name", MODEL_NAME)
    assert imported.returncode == 0, imported.stderr
    listed = run_cli(config, "models", "list").stdout
    assert "installed" in listed and "trust-on-first-use" in listed
    assert run_cli(config, "models", "verify").returncode == 0
    installed = tmp_path / "models" / read_registry(tmp_path / "models")[MODEL_NAME].file
    data = bytearray(installed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    installed.write_bytes(bytes(data))
    verified = run_cli(config, "models", "verify")
    assert verified.returncode == 1 and "FAIL" in verified.stdout


def _settings(tmp_path: Path, **model: Any) -> Settings:
    return Settings(
        storage=StorageSettings(root=str(tmp_path)),
        model=ModelSettings(models_dir=str(tmp_path / "models"), **model),
    )


def test_unregistered_weights_load_only_as_state_dict_with_allow_unverified(tmp_path: Path) -> None:
    state = tmp_path / "site.pt"
    torch.save(xrv.models.DenseNet(num_classes=18).state_dict(), state)
    with pytest.raises(ModelError, match="not the registered file"):
        load_bundle(_settings(tmp_path, weights=str(state)))
    bundle = load_bundle(_settings(tmp_path, weights=str(state), allow_unverified=True))
    assert bundle.weights_status == "unverified" and bundle.warning_label == "UNVERIFIED WEIGHTS"
    pickled = make_release_file(tmp_path / "pickled.pt", seed=3)
    with pytest.raises(ModelError, match="not a plain state dict"):
        load_bundle(_settings(tmp_path, weights=str(pickled), allow_unverified=True))


def test_registered_weights_load_verified(tmp_path: Path, release_file: Path) -> None:
    install(tmp_path / "models", MODEL_NAME, release_file, "import")
    bundle = load_bundle(_settings(tmp_path))
    assert bundle.weights_status == "verified" and bundle.warning_label is None
    assert len(bundle.thresholds) == 18 and bundle.card.resolution == 224


def test_site_threshold_override_is_applied_and_unknown_finding_refused(
    tmp_path: Path, release_file: Path
) -> None:
    install(tmp_path / "models", MODEL_NAME, release_file, "import")
    settings = _settings(tmp_path)
    bundle = load_bundle(
        Settings(
            storage=settings.storage, model=settings.model, thresholds=(("Pneumothorax", 0.3),)
        )
    )
    assert bundle.thresholds[bundle.card.labels.index("Pneumothorax")] == 0.3
    assert "1 site override" in bundle.thresholds_source
    with pytest.raises(ModelError, match="Bogus"):
        load_bundle(
            Settings(storage=settings.storage, model=settings.model, thresholds=(("Bogus", 0.3),))
        )


def test_weights_registered_for_another_model_are_not_verified_for_this_one(
    tmp_path: Path, release_file: Path
) -> None:
    install(tmp_path / "models", MODEL_NAME, release_file, "import")
    other = _settings(tmp_path, name="densenet121-res224-nih", weights=str(release_file))
    with pytest.raises(ModelError, match="not the registered file for densenet121-res224-nih"):
        load_bundle(other)
