"""``dicom-node models import --card``, ``models export``, ``models list`` and ``models verify``
as a site runs them: one line per answer, an exit code, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from dicom_node.inference.registry import read_registry
from tests.byom_support import seeded_densenet, write_card
from tests.helpers import free_port, run_cli, write_config


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_import_export_list_and_verify_a_site_model_from_the_command_line(
    tmp_path: Path, db_url: str
) -> None:
    models_dir = tmp_path / "models"
    config = write_config(
        tmp_path / "node.toml",
        root=tmp_path / "store",
        db_url=db_url,
        port=free_port(),
        models_dir=models_dir,
        extra='[models.site-onnx]\ncatalogue = "site-onnx"\nmode = "shadow"\n',
    )
    save_file(seeded_densenet().state_dict(), str(tmp_path / "w.safetensors"))
    card = write_card(tmp_path / "st.toml", "safetensors")
    imported = run_cli(config, "models", "import", str(tmp_path / "w.safetensors"),
                       "--card", str(card), "--name", "site-st")  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    record = read_registry(models_dir)["site-st"]
    assert imported.stdout.startswith("installed site-st: site-st/model.safetensors (safetensors)")
    assert f"card SHA-256 {record.card_sha256}" in imported.stdout

    out = tmp_path / "exported.onnx"
    exported = run_cli(config, "models", "export", "site-st", "--format", "onnx", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert (
        "max |probability difference| = " in exported.stdout and "(limit 1e-04)" in exported.stdout
    )
    difference = float(exported.stdout.split("difference| = ")[1].split()[0])
    assert difference <= 1e-4
    again = run_cli(config, "models", "import", str(out), "--card", f"{out}.toml",
                    "--name", "site-onnx")  # fmt: skip
    assert again.returncode == 0, again.stderr

    listed = run_cli(config, "models", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(row for row in listed.stdout.splitlines() if " site-onnx " in row)
    onnx_card = read_registry(models_dir)["site-onnx"].card_sha256
    assert line.startswith("* ") and " onnx " in line and f"card {onnx_card[:12]}" in line
    assert "mode shadow" in line and "installed" in line

    verified = run_cli(config, "models", "verify")
    assert verified.returncode == 0 and "ok   site-onnx" in verified.stdout
    (models_dir / "site-st" / "model.toml").write_text("edited = true\n")
    broken = run_cli(config, "models", "verify")
    assert (
        broken.returncode != 0
        and "FAIL site-st: site-st/model.toml does not match" in broken.stdout
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_bad_card_and_untrained_export_are_refused_with_one_line(
    tmp_path: Path, db_url: str
) -> None:
    config = write_config(
        tmp_path / "node.toml", root=tmp_path / "store", db_url=db_url, port=free_port()
    )
    save_file(seeded_densenet().state_dict(), str(tmp_path / "w.safetensors"))
    card = write_card(tmp_path / "bad.toml", "safetensors", labels=["A"], thresholds={"A": 0.5})
    refused = run_cli(config, "models", "import", str(tmp_path / "w.safetensors"),
                      "--card", str(card), "--name", "site")  # fmt: skip
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "w.safetensors is not a densenet121 with 1 outputs" in refused.stderr
    untrained = run_cli(config, "models", "export", "densenet121-res224-all", "--out",
                        str(tmp_path / "x.onnx"))  # fmt: skip
    assert untrained.returncode != 0 and "no weights installed" in untrained.stderr
    assert not (tmp_path / "x.onnx").exists()
