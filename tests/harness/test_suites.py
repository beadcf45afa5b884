import pytest

from fractalbench.harness.suites import SuiteError, list_suites, load_suite, parse_suite

BASE = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}], "models": [{"name": "resnet20"}]}


def with_(**changes):
    raw = {**BASE, **changes}
    return {k: v for k, v in raw.items() if v is not None}


def test_shipped_suites_validate():
    assert {"smoke", "default"} <= set(list_suites())
    for name in list_suites():
        suite = load_suite(name)
        assert suite.models and suite.datasets


@pytest.mark.parametrize("raw, message", [
    (with_(modles=[]), "field 'modles': unknown field; did you mean: models? allowed: name, description"),
    (with_(models=None), "field 'models': is required"),
    (with_(models=[{"name": "resnet21"}]), "field 'models[0].name': unknown model 'resnet21'; did you mean"),
    (with_(datasets=[{"name": "cifar11"}]),
     "field 'datasets[0].name': 'cifar11' is not allowed; did you mean: cifar10, cifar100? allowed: digits, cifar10"),
    (with_(datasets=[{"name": "digits", "image_size": -3}]),
     "field 'datasets[0].image_size': must be a whole number >= 1"),
    (with_(train={"optimizer": "rmsprop"}),
     "field 'train.optimizer': 'rmsprop' is not allowed; allowed: sgd, adam, adamw"),
    (with_(train={"epochs": "two"}), "field 'train.epochs': must be a whole number >= 0"),
    (with_(metrics=["speed"]),
     "field 'metrics[0]': 'speed' is not allowed; did you mean: sweep? allowed: accuracy, cost"),
    (with_(devices=["tpu"]), "field 'devices[0]': 'tpu' is not allowed; allowed: cpu, cuda"),
    (with_(policies=[{"name": "greedy"}]),
     "field 'policies[0].name': unknown exit policy 'greedy'; allowed: confidence"),
    (with_(models=[{"name": "resnet20"}, {"name": "resnet20"}]), "labels must be unique; repeated: resnet20"),
    (with_(models=[{"name": "resnet20", "datasets": ["digits16"]}]),
     "models[0].datasets: digits16 is not a dataset of this suite; allowed: digits8"),
    (with_(datasets=["digits", {"name": "digits", "image_size": 8}],
           models=[{"name": "resnet20", "label": "a", "datasets": ["digits8"]},
                   {"name": "sdn:resnet20", "weights": "cell:a"}]),
     "models[1].weights.source cell:a does not run on digits, where this model runs"),
    (["not", "a", "mapping"], "must be a mapping"),
])
def test_bad_suites_name_file_field_and_allowed_values(raw, message):
    with pytest.raises(SuiteError) as err:
        parse_suite(raw, "suites/x.yaml")
    assert str(err.value).startswith("suite suites/x.yaml: field")
    assert message in str(err.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodels: [resnet20\n")
    with pytest.raises(SuiteError, match=r"broken.yaml: not valid YAML at line \d"):
        load_suite(str(path))


def test_unknown_suite_name_lists_close_matches():
    with pytest.raises(SuiteError, match="unknown suite 'smok'; did you mean: smoke"):
        load_suite("smok")


def test_model_training_overrides_and_digest():
    from fractalbench.harness.suites import train_config_for

    suite = parse_suite(with_(train={"epochs": 2, "lr": 0.1}, models=[{"name": "resnet20", "train": {"epochs": 5}}]))
    assert suite.train.epochs == 2 and train_config_for(suite, suite.models[0]).epochs == 5
    assert train_config_for(suite, suite.models[0]).lr == 0.1
    assert suite.digest != parse_suite(with_(train={"epochs": 3})).digest


@pytest.mark.parametrize("raw, message", [
    (with_(train={"epochs": 2}, models=[{"name": "resnet20"}, {"name": "resnet32", "train": {"warmup_epochs": 3}}]),
     r"field 'models\[1\].train' \(resnet32\): warmup_epochs 3.0 must lie between 0 and epochs \(2\)"),
    (with_(train={"epochs": 2}, models=[{"name": "skipnet38", "attribute_sweep": {
        "attribute": "alpha", "values": [0.1], "train": {"epochs": 1, "warmup_epochs": 1.5}}}]),
     r"field 'models\[0\].attribute_sweep.train' \(skipnet38\): warmup_epochs 1.5 must lie between 0 and epochs"),
])
def test_merged_training_of_an_entry_is_checked(raw, message):
    with pytest.raises(SuiteError, match=message):
        parse_suite(raw)


@pytest.mark.parametrize("raw, message", [
    (with_(models=[{"name": "resnet20"}, {"name": "resnet32"},
                   {"name": "skipnet38", "attribute_sweep": {"attribute": "alpha", "values": ["x"]}}]),
     "field 'models[2].attribute_sweep.values[0]': must be a number, got 'x'"),
    (with_(latency={"repeats": 0}), "field 'latency.repeats': must be a whole number >= 1, got 0"),
    (with_(latency={"batch_sizes": [1, True]}),
     "field 'latency.batch_sizes[1]': must be a whole number >= 1, got True"),
    (with_(latency={"batch_sizes": []}), "field 'latency.batch_sizes': needs at least one batch size"),
    (with_(latency={"modes": ["fast"]}), "field 'latency.modes[0]': 'fast' is not allowed; allowed: compact, mask"),
    (with_(latency={"device": "cuda"}), "field 'latency.device': unknown field; allowed: batch_sizes, warmup, repeats"),
    (with_(latency=5), "field 'latency': must be a mapping with keys from: batch_sizes, warmup"),
    (with_(memory={"method": "rss"}), "field 'memory.method': 'rss' is not allowed; allowed: auto, vmhwm, ru_maxrss"),
    (with_(policies=[{"name": "confidence", "grid": [0.5, 1.5]}]),
     "field 'policies[0].grid[1]': must be a number between 0 and 1, got 1.5"),
    (with_(policies=[{"name": "entropy", "grid": [0.1, -0.2]}]), "field 'policies[0].grid[1]': must be a number >= 0"),
    (with_(policies=[{"name": "patience", "grid": [2, 0.5]}]),
     "field 'policies[0].grid[1]': must be a whole number >= 1, got 0.5"),
    (with_(budgets=[0.5, 2]), "field 'budgets[1]': must be a number between 0 and 1, got 2"),
    (with_(compare={"p_value": 1}), "field 'compare.p_value': must be a number > 0 and < 1, got 1"),
    (with_(compare={"latency_ratio": 0.5}), "field 'compare.latency_ratio': must be a number >= 1, got 0.5"),
    (with_(devices=["cuda:x"]), "field 'devices[0]': 'cuda:x' is not allowed; allowed: cpu, cuda or cuda:N"),
    (with_(datasets=[]), "field 'datasets': needs at least one dataset"),
    (with_(datasets="digits"), "field 'datasets': must be a list, got 'digits'"),
    (with_(datasets=[{"name": "digits", "val_fraction": 0.95}]),
     "field 'datasets[0].val_fraction': must be a number between 0.01 and 0.9, got 0.95"),
    (with_(datasets=[{"name": "digits", "download": "yes"}]), "field 'datasets[0].download': must be true or false"),
    (with_(seed=True), "field 'seed': must be a whole number >= 0, got True"),
    (with_(train={"milestones": [0]}), "field 'train.milestones[0]': must be a whole number >= 1, got 0"),
    (with_(models=[{"name": "resnet20", "kwargs": [1]}]), "field 'models[0].kwargs': must be a mapping, got [1]"),
    (with_(models=[{"name": "skipnet38", "attribute_sweep": {"attribute": "alpha", "values": [1], "set": {"a b": 1}}}]),
     "field 'models[0].attribute_sweep.set.a b': must be a model attribute name, got 'a b'"),
    (with_(name=""), "field 'name': must be a non-empty string, got ''"),
])
def test_errors_name_the_field_path_and_what_is_allowed(raw, message):
    with pytest.raises(SuiteError) as err:
        parse_suite(raw, "suites/x.yaml")
    text = str(err.value)
    assert text.startswith("suite suites/x.yaml: field '") and message in text and "\n" not in text


def test_an_empty_suite_lists_every_required_field():
    with pytest.raises(SuiteError) as err:
        parse_suite(None, "suites/x.yaml")
    assert str(err.value).splitlines() == ["suite suites/x.yaml: 3 problems", "  field 'name': is required",
                                           "  field 'datasets': is required", "  field 'models': is required"]


def test_top_level_that_is_not_a_mapping_lists_the_fields():
    with pytest.raises(SuiteError, match=r"field '\(top level\)': must be a mapping with keys from: name, description"):
        parse_suite(["not", "a", "mapping"], "s.yaml")


def test_binary_file_names_the_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"name: x\n\xff\xfe\x00\x81")
    with pytest.raises(SuiteError, match=rf"suite {path}: not a YAML text file \(byte 8 is not valid UTF-8\)"):
        load_suite(str(path))


def test_missing_yaml_path_names_it(tmp_path):
    with pytest.raises(SuiteError, match="suite file .*nowhere.yaml does not exist"):
        load_suite(str(tmp_path / "nowhere.yaml"))


def test_bundled_suites_are_package_data_with_stable_paths():
    from importlib.resources import files

    from fractalbench.harness.suites import find_suite

    bundled = files("fractalbench.suites")
    assert list_suites() == sorted(p.name[:-5] for p in bundled.iterdir() if p.name.endswith(".yaml"))
    assert find_suite("smoke").read_bytes() == (bundled / "smoke.yaml").read_bytes()
    by_name, by_path = load_suite("smoke"), load_suite(str(bundled / "smoke.yaml"))
    assert by_name.path == "fractalbench/suites/smoke.yaml" and by_name.digest == by_path.digest


def test_suite_holds_the_measurement_settings_types():
    from dataclasses import replace

    from fractalbench.harness.metrics.settings import LatencySettings, MemorySettings

    suite = parse_suite(with_(latency={"batch_sizes": [1, 8], "repeats": 7, "isolate": False, "timeout_s": 30},
                              memory={"batch_size": 4, "method": "ru_maxrss"}))
    assert suite.latency == LatencySettings(batch_sizes=(1, 8), repeats=7, isolate=False, timeout_s=30.0)
    assert suite.memory == MemorySettings(batch_size=4, method="ru_maxrss")
    assert replace(suite.latency, device="cpu", policies=(None,)).policies == (None,)
    defaults = parse_suite(with_())
    assert defaults.latency == LatencySettings() and defaults.memory == MemorySettings()


def test_sections_become_typed_values():
    from fractalbench.harness.suites import PolicyConfig, sweep_train_config, train_config_for

    sweep = {"attribute": "alpha", "values": [0.1, 1], "set": {"training_stage": "hybrid_rl"}, "train": {"lr": 0.01}}
    suite = parse_suite(with_(
        seed=3, train={"epochs": 2}, models=["resnet20", {"name": "skipnet38", "attribute_sweep": sweep}],
        policies=[{"name": "patience", "grid": [2, 3]}], compare={"p_value": 0.05}, evaluate={"batch_size": 64}))
    assert [m.display for m in suite.models] == ["resnet20", "skipnet38"] and suite.eval_batch_size == 64
    assert suite.train.seed == 3 and suite.policies == (PolicyConfig("patience", (2.0, 3.0)),)
    assert suite.compare == {"p_value": 0.05} and suite.models[1].attribute_sweep.values == (0.1, 1.0)
    stage = sweep_train_config(suite, suite.models[1])
    assert (stage.lr, stage.epochs, stage.seed) == (0.01, 2, 3)
    assert train_config_for(suite, suite.models[0]) == suite.train
    assert sweep_train_config(suite, suite.models[0]) is None
    assert train_config_for(parse_suite(with_(models=[{"name": "resnet20", "train": {"epochs": 9}}])),
                            parse_suite(with_()).models[0]) is None  # no `train:` section: no training


def test_with_models_keeps_the_listed_entries_and_the_identity():
    suite = load_suite("smoke")
    kept = suite.with_models(["resnet20", "sdn_resnet20"])
    assert [m.display for m in kept.models] == ["resnet20", "sdn_resnet20"]
    assert (kept.path, kept.digest, kept.raw) == (suite.path, suite.digest, suite.raw)
    with pytest.raises(SuiteError, match="unknown model in suite smoke 'resnet21'; did you mean: resnet20"):
        suite.with_models(["resnet21"])


def test_digest_hashes_the_content_as_written():
    import hashlib
    import json

    raw = with_(description="x")
    expected = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    assert parse_suite(raw).digest == expected and parse_suite(dict(raw)).raw == raw


def test_a_model_with_datasets_runs_on_those_only():
    from fractalbench.harness.cells import plan_cells

    suite = parse_suite(with_(datasets=["digits", {"name": "digits", "image_size": 8}],
                              models=["linear", {"name": "resnet20", "datasets": ["digits8"]}]))
    assert [(c.model.display, c.dataset.label) for c in plan_cells(suite)] == [
        ("linear", "digits"), ("linear", "digits8"), ("resnet20", "digits8")]
