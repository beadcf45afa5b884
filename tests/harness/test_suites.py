import pytest

from harness.suites import SuiteError, list_suites, load_suite, parse_suite

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
    (with_(modles=[]), "field 'modles': unknown field; allowed: name, description"),
    (with_(models=None), "field 'models': is required"),
    (with_(models=[{"name": "resnet21"}]), "field 'models[0].name': unknown model 'resnet21'; did you mean"),
    (with_(datasets=[{"name": "cifar11"}]), "field 'datasets[0].name': 'cifar11' is not allowed; allowed: digits, cifar10"),
    (with_(datasets=[{"name": "digits", "image_size": -3}]), "field 'datasets[0].image_size': must be a whole number >= 1"),
    (with_(train={"optimizer": "rmsprop"}), "field 'train.optimizer': 'rmsprop' is not allowed; allowed: sgd, adam"),
    (with_(train={"epochs": "two"}), "field 'train.epochs': must be a whole number >= 0"),
    (with_(metrics=["speed"]), "field 'metrics[0]': 'speed' is not allowed; allowed: accuracy, cost"),
    (with_(devices=["tpu"]), "field 'devices[0]': 'tpu' is not allowed; allowed: cpu, cuda"),
    (with_(policies=[{"name": "greedy"}]), "field 'policies[0].name': 'greedy' is not allowed"),
    (with_(models=[{"name": "resnet20"}, {"name": "resnet20"}]), "labels must be unique; repeated: resnet20"),
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
    from harness.suites import train_config_for

    suite = parse_suite(with_(train={"epochs": 2, "lr": 0.1}, models=[{"name": "resnet20", "train": {"epochs": 5}}]))
    assert suite.train.epochs == 2 and train_config_for(suite, suite.models[0]).epochs == 5
    assert train_config_for(suite, suite.models[0]).lr == 0.1
    assert suite.digest != parse_suite(with_(train={"epochs": 3})).digest
