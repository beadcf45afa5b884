"""Models from outside ``baselines/``: entry-point plugins and ``package.module:function`` import
paths, through a real suite whose latency is measured in worker processes."""
import json
import logging
import os
import re
import sys
import textwrap

import pytest
import torch

from fractalbench.harness import registry
from fractalbench.harness.metrics import MemorySettings, memory_rows, weight_bytes
from fractalbench.harness.metrics.isolation import worker_env
from fractalbench.harness.registry import ModelSpec, UnknownNameError, create_model, list_models, model_card, name_kind
from fractalbench.harness.results import load_run
from fractalbench.harness.runner import run_suite
from fractalbench.harness.suites import SuiteError, parse_suite

TINY_MODEL = '''
from torch import nn

from fractalbench.harness.early_exit import EarlyExitNetwork


class TinyExit(EarlyExitNetwork):
    """Two stages (a convolution each) and two heads (pool + Linear)."""

    def __init__(self, num_classes, in_chans, width=4):
        stages = [nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU()),
                  nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())]
        heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
                 for _ in range(2)]
        super().__init__(stages, heads)


def {builder}(*, num_classes, in_chans, width=4) -> TinyExit:
    return TinyExit(num_classes, in_chans, width)
'''

REGISTERING_MODULE = '''
from fractalbench.harness.registry import ModelCard, register_model
from {package}.nets import TinyExit


@register_model("{name}", card=ModelCard(family="tinyplug", paper="a test plugin", dynamic_kind="early_exit"))
def _build(*, num_classes, in_chans, width=4):
    return TinyExit(num_classes, in_chans, width)
'''


def write_package(root, package, modules):
    """``root/package/`` with an ``__init__.py`` and ``modules`` ({name: source})."""
    pkg = root / package
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name, source in modules.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(source))


def write_dist(root, dist, entry_points):
    """A ``dist-0.1.dist-info`` folder declaring ``entry_points`` ({name: value}) in fractalbench.models."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder importable here (sys.path) and in measurement workers (PYTHONPATH); the registry
    reads the entry points again on first use, and forgets the plugins afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    registry.reset_plugins()
    yield root
    registry.reset_plugins()
    for name, module in list(sys.modules.items()):  # import-path modules of this folder, imported again next time
        if str(getattr(module, "__file__", None) or "").startswith(str(root)):
            del sys.modules[name]


def tiny_suite(*models):
    raw = {"name": "plugins", "datasets": [{"name": "digits", "image_size": 8}], "models": list(models),
           "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2},
           "metrics": ["accuracy", "sweep", "cost", "latency"],
           "latency": {"isolate": True, "warmup": 1, "repeats": 3, "stream_samples": 4, "cross_check": False}}
    return parse_suite(raw, "plugins.yaml")


def check_suite_with_isolated_latency(out, *models):
    """Run the tiny suite on ``models``; each has both exits measured and every latency row comes
    from a worker without error. Returns the stored cards by model name."""
    summary = run_suite(tiny_suite(*models), out)
    assert summary.failed == [] and len(summary.finished) == len(models)
    frame = load_run(out)
    for model in models:
        rows = frame[frame.model == model]
        assert set(rows[rows.metric == "top1"].exit.dropna().astype(int)) == {0, 1}
        assert (rows.metric == "macs").any() and (rows[rows.metric == "macs"].value > 0).all()
        latency = rows[rows.metric == "latency"]
        assert len(latency) >= 2 and (latency.error == "").all() and (latency.value > 0).all()
        assert all(json.loads(d)["isolated"] for d in latency.detail)
    cells = [json.loads(path.read_text())["meta"] for path in (out / "cells").glob("*.json")]
    return {meta["model"]: meta["card"] for meta in cells}


def test_entry_point_plugins_run_a_suite_with_isolated_latency(site, tmp_path):
    write_package(site, "tinyplug", {"nets": TINY_MODEL.format(builder="tiny_exit"),
                                     "registered": REGISTERING_MODULE.format(package="tinyplug", name="tinyplug_reg")})
    write_dist(site, "tinyplug", {"tinyplug_exit": "tinyplug.nets:tiny_exit", "tinyplug_models": "tinyplug.registered"})
    assert {"tinyplug_exit", "tinyplug_reg"} <= set(list_models("tinyplug*"))
    assert registry.plugin_errors() == []
    callable_card = model_card("tinyplug_exit")  # a callable entry point: default card, kind from its annotation
    assert callable_card.family == "plugin" and callable_card.dynamic_kind == "early_exit"
    assert "tinyplug 0.1" in callable_card.paper
    assert model_card("tinyplug_reg").paper == "a test plugin"  # a module entry point: its own registration
    assert "tinyplug.registered" in registry._MODELS["tinyplug_reg"].origin
    stored = check_suite_with_isolated_latency(tmp_path / "run", "tinyplug_exit", "tinyplug_reg")
    assert stored["tinyplug_exit"]["family"] == "plugin" and stored["tinyplug_exit"]["dynamic_kind"] == "early_exit"
    assert stored["tinyplug_reg"]["family"] == "tinyplug"


def test_import_path_model_runs_a_suite_with_isolated_latency(site, tmp_path):
    write_package(site, "mypkg", {"nets": TINY_MODEL.format(builder="tiny_net")})
    assert name_kind("mypkg.nets:tiny_net") == "import" and name_kind("timm:resnet18") == "prefix"
    model = create_model("mypkg.nets:tiny_net", num_classes=3, in_chans=1, width=2)
    assert model.num_exits == 2 and model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert "mypkg.nets:tiny_net" not in list_models()  # not registered
    stored = check_suite_with_isolated_latency(tmp_path / "run", "mypkg.nets:tiny_net")["mypkg.nets:tiny_net"]
    assert stored["family"] == "import path" and stored["dynamic_kind"] == "early_exit"
    assert "mypkg.nets:tiny_net" in stored["paper"] and "nets.py" in stored["paper"]


def test_isolated_memory_rebuilds_an_import_path_model_in_the_worker(site):
    write_package(site, "mypkg", {"nets": TINY_MODEL.format(builder="tiny_net")})
    spec = ModelSpec("mypkg.nets:tiny_net", {"width": 3}, 10, 1)
    settings = MemorySettings(batch_size=2, repeats=1, per_exit=False)
    rows = memory_rows(spec, None, (1, 8, 8), settings, model="tiny", device="cpu")
    assert rows and all(r["error"] == "" for r in rows), rows
    peaks = [r for r in rows if r["metric"].startswith("memory_peak")]
    assert peaks and all(json.loads(r["detail"])["isolated"] for r in peaks)
    weights = next(r["value"] for r in rows if r["metric"] == "memory_weights")
    assert weights == weight_bytes(spec.build()) / 2**20


def test_a_folder_added_to_sys_path_at_run_time_reaches_the_worker(site, monkeypatch):
    # a notebook's sys.path.append: the folder is on this process's sys.path and not on PYTHONPATH
    monkeypatch.delenv("PYTHONPATH")
    write_package(site, "rtpkg", {"nets": TINY_MODEL.format(builder="tiny_net")})
    spec = ModelSpec("rtpkg.nets:tiny_net", {"width": 2}, 10, 1)
    rows = memory_rows(spec, None, (1, 8, 8), MemorySettings(batch_size=2, repeats=1, per_exit=False),
                       model="tiny", device="cpu")
    peaks = [r for r in rows if r["metric"].startswith("memory_peak")]
    assert peaks and all(r["error"] == "" and json.loads(r["detail"])["isolated"] for r in peaks), rows
    assert str(site) in worker_env(1)["PYTHONPATH"].split(os.pathsep)


def test_a_top_level_module_is_an_import_path_unless_it_is_a_registered_prefix(site):
    (site / "flatnet.py").write_text(textwrap.dedent(TINY_MODEL.format(builder="build")))
    assert name_kind("flatnet:build") == "import"
    assert create_model("flatnet:build", num_classes=4).num_exits == 2
    assert name_kind("resnet20") == "registered" and name_kind("nosuchmodule:x") == "unknown prefix"
    with pytest.raises(UnknownNameError, match="unknown model prefix 'nosuchmodule'"):
        create_model("nosuchmodule:x")


def test_broken_plugin_is_one_error_and_the_other_models_still_work(site, caplog):
    write_package(site, "brokenplug", {"models": "import not_installed_dependency_xyz\n"})
    write_package(site, "goodplug", {"nets": TINY_MODEL.format(builder="good")})
    write_dist(site, "brokenplug", {"broken_models": "brokenplug.models"})
    write_dist(site, "goodplug", {"good_exit": "goodplug.nets:good"})
    with caplog.at_level(logging.WARNING, logger="fractalbench.harness.registry"):
        names = list_models()
    assert "good_exit" in names and "resnet20" in names
    (error,) = registry.plugin_errors()
    for part in ("'broken_models'", "brokenplug.models", "brokenplug 0.1", "not_installed_dependency_xyz"):
        assert part in error
    assert "Traceback" not in error and "\n" not in error
    assert [r.getMessage() for r in caplog.records] == [error]
    with pytest.raises(UnknownNameError) as info:
        create_model("broken_models")
    assert str(info.value) == error
    with pytest.raises(UnknownNameError, match="failed to load: entry point 'broken_models'"):
        create_model("resnet2O")  # an unknown name mentions the plugins that did not load


DUPLICATING_MODULE = '''
from fractalbench.harness.registry import ModelCard, register_model
from dupplug.nets import TinyExit

card = ModelCard(family="dupplug", paper="a plugin that reuses a name")
register_model("dupplug_extra", card=card)(TinyExit)  # registered first, then undone with the plugin
register_model("resnet20", card=card)(TinyExit)
'''


def test_duplicate_plugin_name_names_both_origins_and_registers_nothing(site):
    write_package(site, "dupplug", {"nets": TINY_MODEL.format(builder="tiny"), "registered": DUPLICATING_MODULE})
    write_dist(site, "dupplug", {"dup_models": "dupplug.registered"})
    (error,) = registry.plugin_errors()
    assert "already registered under the name 'resnet20'" in error
    assert "by module fractalbench.baselines.resnet" in error
    assert "module dupplug.nets via entry point 'dup_models'" in error
    assert model_card("resnet20").family == "resnet"  # the first registration stays
    assert "dupplug_extra" not in list_models()  # nothing of the failed plugin is left


def test_duplicate_registration_in_code_names_both_origins():
    card = registry.ModelCard(family="test", paper="none")
    registry.register_model("tmp_dup_origin", card=card)(lambda *, num_classes, in_chans: torch.nn.Linear(1, 1))
    try:
        expected = f"by module {__name__}; registered again by module torch.nn.modules.linear)"
        with pytest.raises(ValueError, match=re.escape(expected)):
            registry.register_model("tmp_dup_origin", card=card)(torch.nn.Linear)
    finally:
        registry.unregister_model("tmp_dup_origin")


@pytest.mark.parametrize("path, message", [
    ("mypkg.nothere:f", r"import path 'mypkg.nothere:f': no module named 'mypkg.nothere'"),
    ("nopkg_xyz.nets:f", r"import path 'nopkg_xyz.nets:f': no module named 'nopkg_xyz'"),
    ("mypkg.nets:tiny_nt", r"import path 'mypkg.nets:tiny_nt': 'mypkg.nets' has no attribute 'tiny_nt'; "
                           r"did you mean: tiny_net"),
    ("mypkg.nets:WIDTH", r"import path 'mypkg.nets:WIDTH': 'WIDTH' is a int, not a callable builder"),
    ("mypkg.nets:", r"import path 'mypkg.nets:' is not of the form package.module:function"),
    ("mypkg.fails:f", r"import path 'mypkg.fails:f': importing 'mypkg.fails' failed: RuntimeError: boom at import"),
    ("mypkg.nets:not_a_module", r"model 'mypkg.nets:not_a_module': its builder returned a str, not an nn.Module"),
])
def test_bad_import_paths_are_one_value_error_naming_the_path(site, path, message):
    write_package(site, "mypkg", {"nets": TINY_MODEL.format(builder="tiny_net") + "\nWIDTH = 4\n\n"
                                  "def not_a_module(*, num_classes, in_chans):\n    return 'x'\n",
                                  "fails": "raise RuntimeError('boom at import')\n"})
    with pytest.raises(ValueError, match=message):
        create_model(path)


def test_a_suite_with_a_bad_import_path_is_refused_naming_the_path(site):
    with pytest.raises(SuiteError, match="import path 'nopkg_xyz.nets:f': no module named 'nopkg_xyz'"):
        tiny_suite("nopkg_xyz.nets:f")
