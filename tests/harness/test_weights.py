"""Trained weights in (fractalbench.harness.weights): public layouts, hashes, URLs, fitting, normalisation, freezing."""
from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import yaml

from fractalbench.harness import contract
from fractalbench.harness.registry import create_model
from fractalbench.harness.results import load_run
from fractalbench.harness.runner import run_suite
from fractalbench.harness.suites import load_suite, parse_suite
from fractalbench.harness.train import TrainConfig, train_model
from fractalbench.harness.weights import (
    IMAGENET_MEAN,
    WeightsConfig,
    WeightsError,
    adapt,
    fit_weights,
    load_weights,
    resolve,
)
from tests.harness.cli_helpers import run_cli
from tests.harness.image_fixtures import write_image_folder

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def akamaster_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict in the layout of akamaster/pytorch_resnet_cifar10's released files:
    DataParallel's ``module.`` prefix, conv1/bn1/linear for the stem and the classifier."""
    rename = {"stem.0.": "conv1.", "stem.1.": "bn1.", "head.2.": "linear."}
    out = {}
    for key, value in model.state_dict().items():
        for new, old in rename.items():
            if key.startswith(new):
                key = old + key[len(new):]
        out["module." + key] = value.clone()
    return out


def save_released(model: torch.nn.Module, folder: Path, stem: str = "resnet20") -> Path:
    """Save like the released files ({'state_dict', 'best_prec1'}) under ``stem-<sha256[:8]>.th``."""
    tmp = folder / f"{stem}.tmp"
    torch.save({"state_dict": akamaster_state(model), "best_prec1": 91.7}, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"{stem}-{digest[:8]}.th"
    tmp.replace(path)
    return path


@pytest.fixture
def trained20(tmp_path):
    """A ResNet-20 with non-default weights and BN statistics, and its released-layout file."""
    torch.manual_seed(3)
    model = create_model("resnet20")
    model.train()
    with torch.no_grad():
        for _ in range(3):  # BN running statistics move away from their initial values
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    return model, save_released(model, tmp_path)


def test_released_layout_loads_into_resnet20_and_gives_its_outputs(trained20):
    source, path = trained20
    target = create_model("resnet20").eval()
    loaded = load_weights(target, WeightsConfig(str(path)))
    assert loaded.adapters == ["dataparallel", "cifar_resnet"] and loaded.target == "model"
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.normalisation.mean == IMAGENET_MEAN  # the released trainer's normalisation
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("name", ["sdn:resnet20", "branchynet_resnet20", "moe_resnet20_top2", "switch_resnet20"])
def test_a_resnet_checkpoint_loads_into_the_backbone_of_every_model_built_on_it(trained20, name):
    """The dense ResNet's weights go into the shared modules; the final exit of the early-exit models
    and the upcycled MoE (experts start as the zero map) compute exactly the ResNet's function."""
    source, path = trained20
    model = create_model(name).eval()
    loaded = load_weights(model, WeightsConfig(str(path)))
    assert loaded.target == "backbone"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        final = contract.forward_exits(model, x)[-1] if contract.num_exits(model) > 1 else model(x)
        assert torch.allclose(final, source(x), atol=1e-5)


def test_skipnet_backbone_takes_the_weights_and_all_open_gates_give_the_resnet(tmp_path):
    torch.manual_seed(0)
    resnet = create_model("resnet56").eval()
    path = save_released(resnet, tmp_path, "resnet56")
    skipnet = create_model("skipnet56").eval()
    assert load_weights(skipnet, WeightsConfig(str(path))).target == "backbone"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gates = torch.ones(skipnet.num_gates, dtype=torch.bool)
        out = skipnet._infer(x, forced_gates=gates).logits
        assert torch.allclose(out, resnet(x), atol=1e-5)


def test_a_checkpoint_of_another_architecture_names_its_missing_keys(trained20):
    _, path = trained20
    with pytest.raises(WeightsError) as err:
        load_weights(create_model("resnet32"), WeightsConfig(str(path)), name="resnet32")
    message = str(err.value)
    assert "\n" not in message and "do not fit resnet32" in message
    assert "60 missing (layer1.3.conv1.weight" in message  # ResNet-32 has 5 blocks per stage, the file 3


def test_a_mis_shaped_classifier_is_named_with_both_shapes(trained20):
    _, path = trained20
    with pytest.raises(WeightsError, match=r"mis-shaped \(head\.2\.weight \[10, 64\] in the file, \[100, 64\]"):
        load_weights(create_model("resnet20", num_classes=100), WeightsConfig(str(path)))


def test_hash_prefix_in_the_name_and_sha256_field_are_both_checked(trained20, tmp_path):
    _, path = trained20
    resolve(WeightsConfig(str(path)))  # its name's prefix matches
    wrong = tmp_path / "resnet20-00000000.th"
    wrong.write_bytes(path.read_bytes())
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(WeightsConfig(str(wrong)))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(WeightsConfig(str(path), sha256="0" * 64))


def test_unknown_adapter_and_a_file_that_holds_no_state_dict_are_one_line(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"epoch": 3}, bad)
    with pytest.raises(WeightsError, match="holds no state dict"):
        load_weights(create_model("resnet20"), WeightsConfig(str(bad)))
    with pytest.raises(WeightsError, match="adapter 'keras' is not one of"):
        adapt({"a": torch.zeros(1)}, "keras")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be read with torch.load"):
        load_weights(create_model("resnet20"), WeightsConfig(str(tmp_path / "junk.pt")))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D401 - keep the test output clean
        pass


def _serve(www, context=None):
    """Serve folder ``www`` on the loopback (over TLS with ``context``); yields (base URL, folder)."""
    www.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"{'https' if context else 'http'}://127.0.0.1:{server.server_address[1]}", www
    server.shutdown()
    server.server_close()


@pytest.fixture
def loopback(tmp_path):
    """An HTTP server on the loopback serving ``tmp_path/www``; yields (base URL, folder)."""
    yield from _serve(tmp_path / "www")


def test_a_url_is_downloaded_once_into_the_cache_and_checked(trained20, loopback, tmp_path, monkeypatch):
    source, path = trained20
    base, www = loopback
    (www / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("FRACTALBENCH_CACHE", str(tmp_path / "cache"))
    url = f"{base}/{path.name}"
    first = load_weights(create_model("resnet20"), WeightsConfig(url))
    assert first.obtained.startswith("downloaded into") and Path(first.path).parent == tmp_path / "cache" / "weights"
    (www / path.name).unlink()  # the second time comes from the cache
    model = create_model("resnet20").eval()
    assert load_weights(model, WeightsConfig(url)).obtained.startswith("cache")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    with pytest.raises(WeightsError, match="HTTP 404"):
        resolve(WeightsConfig(f"{base}/missing-0123abcd.th"))
    with pytest.raises(WeightsError, match="give its sha256"):
        resolve(WeightsConfig(f"{base}/plain.th"))
    with pytest.raises(WeightsError, match="only https URLs"):
        resolve(WeightsConfig("http://example.org/resnet20-12fca82f.th"))


@pytest.fixture
def https_loopback(tmp_path, monkeypatch):
    """An HTTPS server on the loopback (a self-signed certificate for 127.0.0.1, made with openssl and
    trusted through SSL_CERT_FILE) serving ``tmp_path/www``; yields (base URL, folder)."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the loopback HTTPS server")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    yield from _serve(tmp_path / "www", context)


def test_a_suite_entry_with_an_https_url_gives_what_the_file_gives(trained20, https_loopback, tmp_path, monkeypatch):
    """The same weights as a file and as an https URL (downloaded into the cache, hash-checked by the
    prefix in the name): the same test outcomes."""
    _, path = trained20
    base, www = https_loopback
    (www / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("FRACTALBENCH_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "img", size=32, classes=tuple(f"c{i}" for i in range(10)))
    results = {}
    for how, source in (("file", str(path)), ("url", f"{base}/{path.name}")):
        suite = {"name": how, "datasets": [{"name": "imagefolder", "root": str(tmp_path / "img"),
                                            "val_fraction": 0.2}],
                 "models": [{"name": "resnet20", "weights": source}], "metrics": ["accuracy"]}
        run_suite(parse_suite(suite), tmp_path / how)
        (cell,) = (tmp_path / how / "cells").glob("*.json")
        meta = yaml.safe_load(cell.read_text())["meta"]
        results[how] = (load_run(tmp_path / how).query("metric == 'top1'").value.item(), meta["weights"]["sha256"])
    assert results["url"] == results["file"]
    assert (tmp_path / "cache" / "weights" / path.name).is_file()


def test_a_url_whose_file_differs_from_its_hash_is_refused_and_not_kept(trained20, loopback, tmp_path, monkeypatch):
    _, path = trained20
    base, www = loopback
    (www / "resnet20-deadbeef.th").write_bytes(path.read_bytes())
    monkeypatch.setenv("FRACTALBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(WeightsConfig(f"{base}/resnet20-deadbeef.th"))
    assert not (tmp_path / "cache" / "weights" / "resnet20-deadbeef.th").exists()


def test_weights_dir_serves_a_url_without_network(trained20, tmp_path, monkeypatch):
    _, path = trained20
    monkeypatch.setenv("FRACTALBENCH_WEIGHTS_DIR", str(path.parent))
    found = resolve(WeightsConfig(f"https://example.invalid/models/{path.name}"))
    assert found.path == path and "--weights-dir" in found.obtained


# ----- suites ----------------------------------------------------------------------------------------

def write_suite(folder: Path, models: list, **extra) -> Path:
    suite = {"name": "w", "datasets": [{"name": "digits", "image_size": 32}], "models": models,
             "train": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 2}, "metrics": ["accuracy"], **extra}
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_suite_weights_relative_to_the_suite_file_and_stored_with_the_cell(tmp_path):
    torch.manual_seed(1)
    model = create_model("resnet20", in_chans=1)
    (tmp_path / "w").mkdir()
    torch.save(model.state_dict(), tmp_path / "w" / "mine.pt")
    path = write_suite(tmp_path, [{"name": "resnet20", "weights": "w/mine.pt", "train": {"epochs": 0}}])
    summary = run_suite(load_suite(str(path)), tmp_path / "run")
    assert summary.finished and not summary.failed
    record = load_run(tmp_path / "run")
    meta = yaml.safe_load((tmp_path / "run" / "cells" / "resnet20__digits32__cpu.json").read_text())["meta"]
    assert meta["weights"]["sha256"] == hashlib.sha256((tmp_path / "w" / "mine.pt").read_bytes()).hexdigest()
    assert meta["weights"]["normalisation"] is None and meta["weights"]["loaded_into"] == "model"
    assert len(record[record.metric == "top1"]) == 1
    from fractalbench.reports.html import write_report

    html = write_report(tmp_path / "run").read_text()
    assert "Trained weights the cells started from" in html and meta["weights"]["sha256"][:16] in html


def test_cli_run_with_a_wrong_hash_or_another_architecture_is_one_line_and_exit_2(trained20, tmp_path, capsys):
    _, path = trained20
    suite = write_suite(tmp_path, [{"name": "resnet32", "weights": {"source": str(path)}},
                                   {"name": "resnet20", "label": "r20", "weights": {"source": str(path),
                                                                                    "sha256": "a" * 64}}])
    code, out, err = run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "run"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("fractalbench: error:")]
    assert len(lines) == 2, err
    assert "models[0].weights" in lines[0] and "do not fit resnet32: 60 missing" in lines[0]
    assert "models[1].weights" in lines[1] and "sha256 mismatch" in lines[1]
    assert not (tmp_path / "run" / "cells").exists()  # nothing ran


def test_cell_weights_run_first_and_a_frozen_sdn_keeps_the_backbone_exactly(tmp_path):
    """``weights: cell:LABEL`` reorders the cells; with ``freeze: backbone`` the SDN's last exit is
    the ResNet cell's network, so their test outcomes are equal (two independent cells)."""
    path = write_suite(tmp_path, [
        {"name": "sdn:resnet20", "label": "sdn20", "weights": "cell:r20", "train": {"freeze": "backbone"}},
        {"name": "resnet20", "label": "r20"}])
    suite = load_suite(str(path))
    summary = run_suite(suite, tmp_path / "run")
    assert summary.finished == ["r20__digits32__cpu", "sdn20__digits32__cpu"]
    rows = load_run(tmp_path / "run")
    top1 = rows[rows.metric == "top1"]
    dense = top1[top1.model == "r20"].value.item()
    last = top1[(top1.model == "sdn20") & (top1.exit == top1[top1.model == "sdn20"].exit.max())].value.item()
    assert last == pytest.approx(dense)
    train = rows[(rows.metric == "train_seconds") & (rows.model == "sdn20")]
    assert len(train) == 1


def test_a_cell_reference_that_names_no_entry_or_loops_is_a_suite_error(tmp_path):
    from fractalbench.harness.suites import SuiteError

    with pytest.raises(SuiteError, match="cell:nope: no model entry of this suite has that label"):
        parse_suite({"name": "x", "datasets": ["digits"], "models": [{"name": "resnet20", "weights": "cell:nope"}]})
    with pytest.raises(SuiteError, match="refer back to themselves"):
        parse_suite({"name": "x", "datasets": ["digits"], "models": [
            {"name": "resnet20", "label": "a", "weights": "cell:b"},
            {"name": "resnet20", "label": "b", "weights": "cell:a"}]})
    with pytest.raises(SuiteError, match="pretrained: true is for timm: models"):
        parse_suite({"name": "x", "datasets": ["digits"], "models": [{"name": "resnet20", "pretrained": True}]})


def test_models_filter_keeps_the_entries_weights_come_from(tmp_path):
    path = write_suite(tmp_path, [{"name": "resnet20", "label": "r20"}, {"name": "linear"},
                                  {"name": "sdn:resnet20", "label": "s", "weights": "cell:r20"}])
    kept = load_suite(str(path)).with_models(["s"])
    assert [m.display for m in kept.models] == ["r20", "s"]


# ----- freezing --------------------------------------------------------------------------------------

def test_freeze_backbone_trains_only_the_heads_and_keeps_batchnorm_statistics():
    from fractalbench.harness.data import DatasetConfig, load_dataset

    splits = load_dataset(DatasetConfig("digits", image_size=32))
    torch.manual_seed(0)
    model = create_model("sdn:resnet20", in_chans=1)
    backbone = contract.dense_backbone(model)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    heads_before = [p.clone() for p in model.heads[0].parameters()]
    train_model(model, splits.train, TrainConfig(epochs=1, batch_size=64, max_steps_per_epoch=3, freeze="backbone"))
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running statistics
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, model.heads[0].parameters()))
    assert all(p.requires_grad for p in model.parameters())  # as they were before training


def test_freeze_backbone_of_a_static_model_is_refused_before_any_cell(tmp_path, capsys):
    path = write_suite(tmp_path, [{"name": "resnet20", "train": {"freeze": "backbone"}}])
    code, _, err = run_cli(capsys, "run", str(path), "--out", str(tmp_path / "run"))
    assert code == 2 and "models[0].train.freeze" in err and "has none" in err


# ----- normalisation ---------------------------------------------------------------------------------

def test_declared_normalisation_replaces_the_training_split_statistics(tmp_path):
    """An image folder read through the weights' mean/std: the stored pixels are the same, so an
    image reads back as ``(pixel / 255 - mean) / std`` with the declared numbers."""
    from fractalbench.harness.data import DatasetConfig, load_dataset, with_normalisation

    write_image_folder(tmp_path / "img", size=8)
    splits = load_dataset(DatasetConfig("imagefolder", root=str(tmp_path / "img"), val_fraction=0.2))
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.5, 0.25)
    moved = with_normalisation(splits, mean, std, "test")
    raw = splits.test.images[0].float() / 255
    expect = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(moved.test[0][0], expect)
    assert moved.info["normalisation"]["mean"] == list(mean)
    with pytest.raises(ValueError, match="1 channel"):
        with_normalisation(splits, (0.5,), (0.5,), "test")
    digits = load_dataset(DatasetConfig("digits"))
    with pytest.raises(ValueError, match="stored normalised"):
        with_normalisation(digits, (0.5,), (0.5,), "test")


# ----- the real public weights (../shared) -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "weights" / "resnet20-12fca82f.th").is_file()
                    or not (SHARED / "cifar10-jpg.tar.gz").is_file(),
                    reason="../shared/data (the public weights and CIFAR-10) absent")
def test_public_resnet20_as_loaded_scores_81_03_on_the_jpeg_test_split(tmp_path):
    import tarfile

    data = Path(__file__).resolve().parents[2] / "data"
    if not (data / "cifar10-jpg" / "test").is_dir():
        data = tmp_path / "data"
        with tarfile.open(SHARED / "cifar10-jpg.tar.gz") as tar:
            tar.extractall(data, filter="data")
    suite = {"name": "w20", "datasets": [{"name": "cifar10", "root": str(data)}], "evaluate": {"batch_size": 500},
             "models": [{"name": "resnet20", "weights": str(SHARED / "weights" / "resnet20-12fca82f.th")}],
             "train": {"epochs": 0}, "metrics": ["accuracy"]}
    run_suite(parse_suite(suite), tmp_path / "run")
    rows = load_run(tmp_path / "run")
    assert rows[rows.metric == "top1"].value.item() == pytest.approx(81.03, abs=0.05)


def test_fit_weights_on_the_meta_device_checks_without_copying(trained20):
    from fractalbench.harness.weights import read_state

    _, path = trained20
    with torch.device("meta"):
        model = create_model("sdn:resnet20")
    state, _ = read_state(path)
    state, _ = adapt(state)
    assert fit_weights(model, state, "x") == "backbone"


# ----- the command line and the Python API -----------------------------------------------------------

def test_evaluate_check_and_profile_take_weights(trained20, tmp_path, capsys):
    _, path = trained20
    code, out, _ = run_cli(capsys, "check", "sdn:resnet20", "--weights", str(path))
    assert code == 0 and "FAIL" not in out
    code, out, _ = run_cli(capsys, "profile", "resnet20", "--weights", str(path))
    assert code == 0 and f"weights: {path}" in out and "into the model" in out
    code, _, err = run_cli(capsys, "profile", "resnet32", "--weights", str(path))
    assert code == 2 and "do not fit resnet32" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "evaluate", "resnet20")
    assert code == 2 and "give one of --checkpoint" in err


def test_evaluate_with_weights_uses_their_normalisation_and_says_so(tmp_path, capsys):
    write_image_folder(tmp_path / "img", size=32, classes=tuple(f"c{i}" for i in range(10)))
    torch.manual_seed(2)
    path = save_released(create_model("resnet20").eval(), tmp_path)
    code, out, err = run_cli(capsys, "evaluate", "resnet20", "--weights", str(path), "--dataset", "imagefolder",
                             "--root", str(tmp_path / "img"), "--image-size", "32")
    assert code == 0, err
    assert "normalisation: adapter cifar_resnet" in out and "test split (30 images, 32x32)" in out


def test_benchmark_api_takes_weights_and_epochs_0_measures_them_as_loaded(tmp_path):
    from fractalbench.harness.api import benchmark

    torch.manual_seed(4)
    model = create_model("resnet20", in_chans=1)
    torch.save(model.state_dict(), tmp_path / "r20.pt")
    rows = benchmark("resnet20", {"name": "digits", "image_size": 32}, metrics=["accuracy"],
                     train={"epochs": 0}, weights=str(tmp_path / "r20.pt"), as_frame=True)
    direct = benchmark(model, {"name": "digits", "image_size": 32}, metrics=["accuracy"], as_frame=True)
    top1 = lambda frame: frame[frame.metric == "top1"].value.item()  # noqa: E731
    assert top1(rows) == pytest.approx(top1(direct))  # the file's weights, not a fresh initialisation


def test_timm_pretrained_loads_timm_weights_and_their_normalisation(tmp_path):
    """timm's own pretrained path, offline: ``pretrained_cfg_overlay`` points timm at a local file."""
    import timm

    torch.manual_seed(5)
    source = timm.create_model("resnet10t", num_classes=3)
    torch.save(source.state_dict(), tmp_path / "r10t.pth")
    entry = {"name": "timm:resnet10t", "pretrained": True,
             "kwargs": {"pretrained_cfg_overlay": {"file": str(tmp_path / "r10t.pth"), "num_classes": 3}}}
    write_image_folder(tmp_path / "img", size=32)
    suite = {"name": "t", "datasets": [{"name": "imagefolder", "root": str(tmp_path / "img"), "val_fraction": 0.2}],
             "models": [entry], "metrics": ["accuracy"]}
    run_suite(parse_suite(suite), tmp_path / "run")
    import json

    (cell,) = (tmp_path / "run" / "cells").glob("*.json")
    meta = json.loads(cell.read_text())["meta"]
    assert meta.get("weights"), meta.get("traceback")
    model = create_model("timm:resnet10t", num_classes=3)
    model.load_state_dict(source.state_dict())
    from fractalbench.harness.weights import state_sha256

    assert meta["weights"]["sha256"] == state_sha256(model)
    assert meta["weights"]["normalisation"]["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN)
