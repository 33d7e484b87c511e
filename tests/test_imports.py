"""What importing the node's modules costs: no model framework outside the analysis path, and
no argon2 work before the first log-in.

Each check runs in a fresh interpreter, since this test process has long imported torch.
``dicom-node --help``, ``status``, ``config check``, the web app and the output builders must
start without torch (seconds of start-up and hundreds of MB for nothing); only
``dicom_node/inference/`` and the worker that calls it may load it.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import dicom_node
from tests.helpers import REPO

FRAMEWORKS = ("torch", "torchvision", "torchxrayvision", "onnxruntime", "onnx", "safetensors")
OUTPUTS = tuple(
    sorted(
        m.name
        for m in pkgutil.iter_modules([str(REPO / "dicom_node" / "outputs")], "dicom_node.outputs.")
    )
)
ENTRY_POINTS = (
    "dicom_node.cli",
    "dicom_node.cli.main",
    "dicom_node.web.app",
    "dicom_node.config.settings",
    "dicom_node.jobs.delivery",
    ", ".join(OUTPUTS),
)
# Modules that may import a framework when imported: the analysis path itself.
MAY_LOAD_FRAMEWORK = ("dicom_node.inference", "dicom_node.jobs.worker")


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def framework_chains(importtime: str) -> list[list[str]]:
    """From ``-X importtime`` output: for each framework module imported at top level, the
    chain of modules that imported it, outermost first.

    The report lists each module after everything it imported, indented two spaces per
    level of nesting; so a module's importer is the next line one level further out.
    """
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:  # the heading
            continue
        name = line.rsplit("|", 1)[1]
        rows.append((len(name) - len(name.lstrip(" ")), name.strip()))
    chains = []
    for position, (depth, name) in enumerate(rows):
        if name not in FRAMEWORKS:  # the top-level package: one chain per framework
            continue
        chain, level = [name], depth
        for outer_depth, outer in rows[position + 1 :]:
            if outer_depth < level:
                chain.append(outer)
                level = outer_depth
        chains.append(list(reversed(chain)))
    return chains


@pytest.mark.parametrize("modules", ENTRY_POINTS)
def test_importing_loads_no_model_framework(modules: str) -> None:
    imported = _python("-X", "importtime", "-c", f"import {modules}")
    assert imported.returncode == 0, imported.stderr[-2000:]
    chains = framework_chains(imported.stderr)
    assert not chains, f"import {modules} loads a model framework:\n" + "\n".join(
        "  " + " -> ".join(chain) for chain in chains
    )


# A fresh interpreter in which importing a framework fails and is recorded with the chain of
# dicom_node modules whose top-level code was running at the time: each module of the package
# outside MAY_LOAD_FRAMEWORK is imported in turn, and a module that failed is tried again by
# every later importer (Python forgets a failed import), so each one is named.
_SWEEP = """
import importlib, sys
FRAMEWORKS, MODULES = {frameworks!r}, {modules!r}
attempts = []

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in FRAMEWORKS:
            return None
        frame, chain = sys._getframe(1), []
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if frame.f_code.co_name == "<module>" and module.startswith("dicom_node"):
                chain.append(module)
            frame = frame.f_back
        attempts.append(" -> ".join([*reversed(chain), name]))
        raise ImportError("refused: " + name)

sys.meta_path.insert(0, Refuse())
for module in MODULES:
    del attempts[:]
    try:
        importlib.import_module(module)
    except Exception:
        pass
    if attempts:
        print(module + ": " + attempts[0])
"""


def test_no_module_outside_the_analysis_path_loads_a_model_framework() -> None:
    modules = sorted(
        m.name
        for m in pkgutil.walk_packages(dicom_node.__path__, "dicom_node.")
        if m.name != "dicom_node.__main__" and not m.name.startswith(MAY_LOAD_FRAMEWORK)
    )
    assert "dicom_node.cli.main" in modules and "dicom_node.web.app" in modules
    swept = _python("-c", _SWEEP.format(frameworks=FRAMEWORKS, modules=modules))
    assert swept.returncode == 0, swept.stderr[-2000:]
    assert not swept.stdout.strip(), (
        "these modules load a model framework when imported "
        "(module: importing chain):\n" + swept.stdout
    )


def test_the_checks_see_a_framework_import() -> None:
    """The two checks above on a module known to load torch (so they can fail)."""
    imported = _python("-X", "importtime", "-c", "import dicom_node.inference.networks")
    assert ["dicom_node.inference.networks", "torch"] in framework_chains(imported.stderr)
    swept = _python(
        "-c", _SWEEP.format(frameworks=FRAMEWORKS, modules=["dicom_node.inference.models"])
    )
    assert swept.stdout.startswith("dicom_node.inference.models: dicom_node.inference.models ->")


# argon2's hashing entry points, wrapped before our modules are imported: a call to any of them
# while importing is recorded.  The dummy hash of users.py is made on the first log-in check.
_ARGON2 = """
import argon2, argon2.low_level, argon2._password_hasher as password_hasher
calls = []

def recording(module, name):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        calls.append(module.__name__ + "." + name)
        return original(*args, **kwargs)
    setattr(module, name, wrapper)

for module, name in ((argon2.low_level, "hash_secret"), (argon2.low_level, "hash_secret_raw"),
                     (password_hasher, "hash_secret"), (argon2.PasswordHasher, "hash")):
    recording(module, name)
import dicom_node.web.users as users, dicom_node.web.login
print("calls", calls, "cached", users._dummy_hash.cache_info().currsize)
users.password_matches(None, "any password")
print("calls", calls, "cached", users._dummy_hash.cache_info().currsize)
"""


def test_importing_the_user_modules_computes_no_argon2_hash() -> None:
    result = _python("-c", _ARGON2)
    assert result.returncode == 0, result.stderr[-2000:]
    after_import, after_check = result.stdout.splitlines()
    assert after_import == "calls [] cached 0"
    # The first check makes the dummy hash: the wrappers do see the hashing they look for.
    assert after_check == "calls ['argon2.low_level.hash_secret'] cached 1"
