import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fractalbench.harness.checkpoints import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from fractalbench.harness.data import DatasetConfig, load_dataset
from fractalbench.harness.evaluate import collect_exit_logits, topk_accuracy
from fractalbench.harness.registry import create_model
from fractalbench.harness.train import TrainConfig, TrainingError, ddp_find_unused_parameters, train_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits8():
    return load_dataset(DatasetConfig("digits", image_size=8))


def trained(splits, cfg, name="resnet20", **kw):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1)
    train_model(model, splits.train, cfg, **kw)
    return model


def test_same_seed_same_accuracy_and_training_learns(digits8):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=3)
    a, b = trained(digits8, cfg), trained(digits8, cfg)
    la, y = collect_exit_logits(a, digits8.test)
    lb, _ = collect_exit_logits(b, digits8.test)
    assert torch.equal(la[0], lb[0])
    assert topk_accuracy(la[0], y) > 50.0  # 10 classes: chance is 10%


def test_interrupted_training_resumes_to_the_same_weights(digits8, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=1, schedule="cosine")
    straight = trained(digits8, cfg)
    ckpt = tmp_path / "m.pt"

    def stop_after_first(epoch, means):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trained(digits8, cfg, checkpoint=ckpt, on_epoch=stop_after_first)
    assert read_checkpoint(ckpt)["epoch"] == 1
    resumed = trained(digits8, cfg, checkpoint=ckpt)
    for (n, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-6), n


def test_bf16_autocast_trains_in_bf16_and_keeps_fp32_weights(digits8):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=2, max_steps_per_epoch=3)
    init = torch.nn.utils.parameters_to_vector(trained(digits8, TrainConfig(epochs=0)).parameters())
    fp32 = torch.nn.utils.parameters_to_vector(trained(digits8, cfg).parameters())
    conv_dtypes = []
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    hook = model.stem[0].register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    train_model(model, digits8.train, TrainConfig(**{**cfg.__dict__, "precision": "bf16"}))
    hook.remove()
    assert conv_dtypes == [torch.bfloat16] * 3  # three training steps ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    bf16 = torch.nn.utils.parameters_to_vector(model.parameters())
    assert not torch.equal(bf16, fp32)  # bf16 rounding changed the steps...
    cosine = torch.nn.functional.cosine_similarity(bf16 - init, fp32 - init, dim=0)
    assert cosine > 0.9, cosine  # ...but not their direction (0.93 measured)
    with pytest.raises(ValueError, match="precision 'fp16' is not one of fp32, bf16"):
        TrainConfig(precision="fp16")


@pytest.mark.slow  # inductor compiles the step for about a minute
def test_compiled_training_step_gives_the_eager_weights(digits8):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=4, max_steps_per_epoch=3)
    eager = trained(digits8, cfg)
    compiled = trained(digits8, TrainConfig(**{**cfg.__dict__, "compile": True}))
    assert type(compiled).__name__ == type(eager).__name__  # the plain module, not the compiled wrapper
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod." prefix in checkpoints
    for (name, p), q in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), rtol=1e-3, atol=1e-4), name


def test_nan_loss_fails_with_a_clear_error(digits8):
    # the first step's loss is finite; its NaN learning rate makes every weight NaN for step 2
    # the host looks every CHECK_EVERY steps: the step where it began is still the one reported
    with pytest.raises(TrainingError,
                       match=r"not finite at epoch 1, step 2 \(cross_entropy=nan, loss=nan; seen at step \d+\)"):
        trained(digits8, TrainConfig(epochs=1, lr=float("nan")), name="linear")


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} is corrupt"):
        load_checkpoint(bad, create_model("resnet20"))
    good = tmp_path / "r20.pt"
    save_checkpoint(good, create_model("resnet20"))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(good, create_model("resnet32"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt", create_model("resnet20"))


def test_checkpoint_loads_with_weights_only(tmp_path):
    model = create_model("resnet20")
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, spec={"name": "resnet20", "kwargs": {}}, epoch=3)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 3
    fresh = create_model("resnet20")
    load_checkpoint(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def _train_cmd(nproc, out):
    args = ["--model", "linear", "--epochs", "2", "--batch-size", "64", "--lr", "0.1", "--no-augment",
            "--out", str(out)]
    if nproc == 1:
        return [sys.executable, "-m", "fractalbench.harness.distributed", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "fractalbench.harness.distributed", *args]


def test_ddp_two_processes_gloo_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for nproc in (1, 2):
        proc = subprocess.run(_train_cmd(nproc, tmp_path / f"w{nproc}.pt"), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = torch.load(tmp_path / "w1.pt", weights_only=True), torch.load(tmp_path / "w2.pt", weights_only=True)
    assert two["extra"]["world_size"] == 2
    for name, w in one["model"].items():
        assert torch.allclose(w, two["model"][name], atol=1e-5), name
    assert abs(one["extra"]["top1"] - two["extra"]["top1"]) <= 0.6  # at most two test samples differ


def test_ddp_looks_for_unused_parameters_where_a_step_can_leave_some_out(tiny_models):
    assert ddp_find_unused_parameters(tiny_models["tiny_routed"]()) is True   # unchosen experts
    assert ddp_find_unused_parameters(tiny_models["tiny_gated"]()) is True    # closed gates
    assert ddp_find_unused_parameters(tiny_models["tiny_two_exit"]()) is False
    assert ddp_find_unused_parameters(create_model("resnet20")) is False
    with torch.device("meta"):  # FractalNet says so itself (drop-path); no need to allocate 34M weights
        assert ddp_find_unused_parameters(create_model("fractalnet20")) is True
    routed = tiny_models["tiny_routed"]()
    routed.ddp_find_unused_parameters = False  # the model's own answer wins
    assert ddp_find_unused_parameters(routed) is False


def test_ddp_two_processes_train_a_moe_whose_experts_are_not_all_chosen(tmp_path):
    # 4x4 digits leave one token per image after ResNet-20's two stride-2 stages: a rank's 8 images
    # choose at most 8 of the 16 top-1 experts, so every step leaves experts without a gradient,
    # which plain DDP rejects on the next step ("Expected to have finished reduction ...").
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "moe.pt"
    kwargs = '{"num_experts": 16, "k": 1, "expansion": 1, "moe_layers": 1}'
    args = ["--model", "moe_resnet20_top2", "--kwargs", kwargs, "--image-size", "4", "--epochs", "1",
            "--batch-size", "16", "--lr", "0.05", "--no-augment", "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fractalbench.harness.distributed", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out, weights_only=True)
    assert state["extra"]["world_size"] == 2
    assert all(torch.isfinite(w).all() for w in state["model"].values() if w.is_floating_point())


def test_warmup_rises_linearly_then_the_cosine_runs_over_the_remaining_steps():
    from fractalbench.harness.train import lr_factor, make_scheduler
    # 2 epochs of 10 steps, warm-up 0.5 epoch = 5 steps: 1/5 .. 5/5, then cosine over 15 steps
    f = lr_factor(TrainConfig(epochs=2, warmup_epochs=0.5, schedule="cosine"), 10)
    assert [round(f(s), 12) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f(5) == 1.0 and abs(f(5 + 5) - 0.75) < 1e-12 and abs(f(20) - 0.0) < 1e-12  # cos(pi/3) -> 0.75
    # without warm-up the cosine is the one over all steps (unchanged recipes keep their schedule)
    g = lr_factor(TrainConfig(epochs=2, schedule="cosine"), 10)
    assert g(0) == 1.0 and abs(g(10) - 0.5) < 1e-12
    # step schedule: milestones stay in epochs from the start
    h = lr_factor(TrainConfig(epochs=3, warmup_epochs=1, schedule="step", milestones=(2,), gamma=0.1), 4)
    assert [round(h(s), 12) for s in range(12)] == [0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1]
    # the optimiser really sees it
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make_scheduler(opt, TrainConfig(epochs=1, lr=0.1, warmup_epochs=1, schedule="none"), 4)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [round(v, 12) for v in seen] == [0.025, 0.05, 0.075, 0.1, 0.1]


def test_warmup_longer_than_training_is_refused():
    with pytest.raises(ValueError, match="warmup_epochs 3 must lie between 0 and epochs \\(2\\)"):
        TrainConfig(epochs=2, warmup_epochs=3)
    with pytest.raises(ValueError, match="warmup_epochs -1 must lie between 0 and epochs \\(0\\)"):
        TrainConfig(epochs=0, warmup_epochs=-1)
    assert TrainConfig(epochs=0, warmup_epochs=0.3).epochs == 0  # nothing trains: an inherited warm-up is moot
