"""Training controls: optimizers by name, learning-rate schedules (resumable), gradient clipping,
bf16 mixed precision with float32 densities, and experiment tracking (TensorBoard, MLflow)."""

import json
import math

import pytest
import torch

import pvae
from pvae.checkpoint import load_checkpoint
from pvae.controls import LRSchedule, use_precision

SMALL = pvae.RunConfig(latent_dim=4, net={"hidden": (32,)})


def small_vae(data, seed=0):
    torch.manual_seed(seed)
    return pvae.build_vae(SMALL, data.data_dim)


def test_schedules_follow_their_definitions():
    lrs = lambda s, n, metrics=None: [s.after_epoch(e, None if metrics is None else metrics[e - 1])  # noqa: E731
                                     for e in range(1, n + 1)]
    assert lrs(LRSchedule("step", 1.0, 0.5, 2), 5) == [1.0, 0.5, 0.5, 0.25, 0.25]
    assert lrs(LRSchedule("exponential", 1.0, 0.9), 3) == pytest.approx([0.9, 0.81, 0.729])
    cosine = lrs(LRSchedule("cosine", 1.0, min_lr=0.1, epochs=4), 4)
    assert cosine[1] == pytest.approx(0.55) and cosine[-1] == pytest.approx(0.1)
    # Burda et al.: stage i = 0..7 lasts 3^i epochs at 10^(-i/7); after_epoch(e) is epoch e+1's rate
    iwae = [1.0] + lrs(LRSchedule("iwae", 1.0), 3300)[:-1]
    stages = [round(-7 * math.log10(v)) for v in iwae]
    assert [stages.count(i) for i in range(8)] == [1, 3, 9, 27, 81, 243, 729, 2187 + 20]
    plateau = lrs(LRSchedule("plateau", 1.0, 0.5, 2), 6, metrics=[1, 2, 2, 1.5, 3, 2])
    assert plateau == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    # the plateau's counters are state: a schedule restored from it continues the same
    metrics = [1, 2, 2, 1.5, 3, 2, 2, 2]
    straight = LRSchedule("plateau", 1.0, 0.5, 2)
    first = LRSchedule("plateau", 1.0, 0.5, 2)
    [first.after_epoch(e, metrics[e - 1]) for e in range(1, 4)]
    second = LRSchedule("plateau", 1.0, 0.5, 2)
    second.state = dict(first.state)
    assert [second.after_epoch(e, metrics[e - 1]) for e in range(4, 9)] == lrs(straight, 8, metrics)[3:]
    with pytest.raises(pvae.UsageError, match="unknown lr_schedule"):
        LRSchedule("linear")


@pytest.mark.parametrize("schedule", [{"name": "step", "step": 1, "gamma": 0.5}, "cosine"])
def test_a_resumed_run_continues_its_schedule(digits, tmp_path, schedule):
    kwargs = dict(batch_size=200, progress=False, lr=3e-3, lr_schedule=schedule, restore_best=False)
    a = small_vae(digits)
    history = pvae.fit(a, digits.train, digits.valid, epochs=4, **kwargs)
    assert [r["lr"] for r in history.records][1] < 3e-3
    b = small_vae(digits)
    # interrupted after its first epoch (the time limit), then resumed: the same run of 4 epochs
    pvae.fit(b, digits.train, digits.valid, epochs=4, run_dir=tmp_path, max_time=1e-9, **kwargs)
    resumed = pvae.fit(b, digits.train, digits.valid, epochs=4, run_dir=tmp_path, resume=True, **kwargs)
    assert [r["lr"] for r in resumed.records] == [r["lr"] for r in history.records]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(pvae.UsageError, match="cannot resume"):  # another schedule is another run
        pvae.fit(b, digits.train, digits.valid, epochs=4, run_dir=tmp_path, resume=True,
                 **{**kwargs, "lr_schedule": "exponential"})


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD), ("adamax", torch.optim.Adamax)])
def test_every_optimizer_trains(digits, name, cls, monkeypatch):
    import pvae.training.controls as controls

    made = []
    original = controls.make_optimizer  # what every registered optimizer builds with
    monkeypatch.setattr(controls, "make_optimizer", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    vae = small_vae(digits)
    untrained = pvae.evaluate_bounds(vae, digits.valid, 1, seed=0)["elbo"].mean
    lr = 0.05 if name == "sgd" else 3e-3
    history = pvae.fit(vae, digits.train, digits.valid, epochs=4, batch_size=50, lr=lr, optimizer=name,
                       momentum=0.9 if name == "sgd" else 0.0, progress=False)
    assert type(made[0]) is cls
    assert history.val_elbo[-1] > untrained + 10  # measured: from about -44 to -25 .. -30 nats
    with pytest.raises(pvae.UsageError, match="momentum"):
        pvae.fit(vae, digits.train, epochs=1, optimizer="adam", momentum=0.9, progress=False)


def test_clipping_bounds_the_gradient_step(digits):
    """Plain SGD with learning rate 1 on one full-batch step: the parameters move by the clipped
    gradient, whose norm is the clip value."""
    moved = {}
    for clip in (None, 0.01):
        vae = small_vae(digits)
        before = torch.cat([p.detach().flatten().clone() for p in vae.parameters()])
        pvae.fit(vae, digits.train, epochs=1, batch_size=len(digits.train), lr=1.0, optimizer="sgd",
                 clip_grad_norm=clip, progress=False)
        moved[clip] = float((torch.cat([p.detach().flatten() for p in vae.parameters()]) - before).norm())
    assert moved[0.01] == pytest.approx(0.01, rel=1e-3)
    assert moved[None] > 1.0


def test_bf16_networks_keep_every_density_in_float32_and_agree_within_monte_carlo_error(digits):
    vae = small_vae(digits)
    pvae.fit(vae, digits.train, digits.valid, epochs=10, batch_size=50, lr=3e-3, progress=False)
    x = digits.test
    fp32 = pvae.evaluate_bounds(vae, x, 64, seed=1)
    z = torch.randn(5, 4)
    reference = vae.decoder(z)
    use_precision(vae, "bf16")
    out = vae.decoder(z)
    assert out.dtype == torch.float32 and not torch.equal(out, reference)  # bf16 inside, float32 out
    assert (out - reference).abs().max() < 0.1
    bf16 = pvae.evaluate_bounds(vae, x, 64, seed=1)
    for name in ("elbo", "iwae"):
        assert bf16[name].values.dtype == torch.float64
        # the same draws: the difference is bf16 rounding, far inside the Monte Carlo error
        assert abs(bf16[name].mean - fp32[name].mean) < fp32[name].stderr
    use_precision(vae, "fp32")
    assert torch.equal(vae.decoder(z), reference)
    history = pvae.fit(small_vae(digits), digits.train, digits.valid, epochs=3, batch_size=50, lr=3e-3,
                       precision="bf16", progress=False)
    assert history.val_elbo[-1] > history.val_elbo[0]


def test_tensorboard_and_mlflow_receive_the_records_and_files(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pvae.cli import main

    monkeypatch.chdir(tmp_path)  # MLflow's default local store: ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--latent-dim", "2", "--hidden", "16", "--no-progress",
            "--run-dir", str(run), "--log", "tensorboard,mlflow"]
    assert main([*args, "--epochs", "2"]) == 0
    assert main([*args, "--epochs", "3", "--resume"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("val_elbo")] == pytest.approx([r["val_elbo"] for r in records])
    assert {"elbo_curves", "latent"} <= set(events.Tags()["images"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run_id = (run / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "val_elbo")
    assert [m.step for m in history] == [1, 2, 3]  # the resumed run continued the same MLflow run
    assert [m.value for m in history] == pytest.approx([r["val_elbo"] for r in records])
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.data.params["training.lr"] == "0.001" and mlflow_run.info.status == "FINISHED"
    assert {"config.json", "metrics.jsonl", "elbo_curves.png"} <= {a.path for a in client.list_artifacts(run_id)}


def test_an_unknown_tracker_is_refused_before_anything_is_written(tmp_path):
    from pvae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--log", "wandb", "--run-dir", str(run)]) == 2
    assert not run.exists()


def test_optimizers_and_schedules_are_parts_declared_once():
    """Their options come from the factories' keyword parameters (one place): the config's nested
    training section, the generated flags and the errors all follow from them."""
    from pvae.cli import _config_from_args, _parser
    from pvae.training.controls import OPTIMIZERS, SCHEDULES

    assert set(OPTIMIZERS.options("sgd")) == {"momentum", "weight_decay"} and set(OPTIMIZERS.options("adam")) == {
        "weight_decay"}
    assert set(SCHEDULES.options("plateau")) == {"gamma", "patience"} and set(SCHEDULES.options("cosine")) == {"min_lr"}
    training = pvae.Training(optimizer={"name": "sgd", "momentum": 0.9}, lr_schedule="cosine")
    assert training.to_dict()["optimizer"] == {"name": "sgd", "momentum": 0.9, "weight_decay": 0.0}
    assert training.to_dict()["lr_schedule"] == {"name": "cosine", "min_lr": 0.0}
    args = _parser().parse_args(["train", "--optimizer", "sgd", "--optimizer-momentum", "0.5",
                                 "--lr-schedule", "plateau", "--lr-schedule-patience", "4"])
    args.run_dir = None
    config = _config_from_args(args)
    assert config.training.optimizer == pvae.Part("sgd", momentum=0.5, weight_decay=0.0)
    assert config.training.lr_schedule == pvae.Part("plateau", gamma=0.5, patience=4)
    with pytest.raises(pvae.UsageError, match="'adam' does not take momentum; it takes weight_decay"):
        pvae.Training(optimizer={"name": "adam", "momentum": 0.9})
    with pytest.raises(pvae.UsageError, match="unknown lr_schedule 'linear'"):
        pvae.Training(lr_schedule="linear")


def test_pvae_02_flat_training_keys_still_read():
    """A config.json of pvae 0.2 kept the optimizer's and schedule's options as flat training keys:
    they move into the parts (defaults of options a part does not take are dropped, other values are
    an error), and fit's keywords of then still work."""
    old = {"optimizer": "sgd", "weight_decay": 0.0, "momentum": 0.9, "lr_schedule": "step", "lr_gamma": 0.3,
           "lr_step": 2, "lr_min": 0.0}
    training = pvae.RunConfig.from_dict({"version": 2, "training": old}).training
    assert training.optimizer == pvae.Part("sgd", momentum=0.9, weight_decay=0.0)
    assert training.lr_schedule == pvae.Part("step", gamma=0.3, step=2)
    with pytest.raises(pvae.UsageError, match="lr_min is not an option of the lr_schedule 'step'"):
        pvae.RunConfig(training={**old, "lr_min": 0.1})
    assert pvae.Training().replace(lr_schedule="plateau", lr_step=3).lr_schedule == pvae.Part(
        "plateau", gamma=0.5, patience=3)
