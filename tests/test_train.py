import math
"""The training loop: learning, resume, isolation, checkpoints, failures that lose nothing."""

import hashlib

import pyro
import pytest
import torch

import pvae
from pvae.checkpoint import load_checkpoint
from pvae.train import CHECKPOINT_FILE, METRICS_FILE

SMALL = pvae.RunConfig(latent_dim=4, net={'hidden': (32,)})


def small_vae(data):
    return pvae.build_vae(SMALL, data.data_dim)


def test_loss_decreases_on_digits(digits):
    vae = small_vae(digits)
    history = pvae.fit(vae, digits.train, digits.valid, epochs=15, batch_size=50, progress=False)
    val = history.val_elbo
    assert len(val) == 15
    # from about -44 nats after one epoch to better than -30 (measured: -27.5)
    assert val[0] < -35 and max(val) > -30
    assert history.train_objective[-1] > history.train_objective[0] + 10


def test_default_digits_run_reaches_stated_validation_elbo(digits, tmp_path):
    """README states: `pvae train` (defaults) reaches a validation ELBO above -20 nats."""
    config = pvae.RunConfig()
    history = pvae.train_run(config, tmp_path / "run", progress=False, dataset=digits).history
    assert history.best_val_elbo > -20.0


def test_resume_continues_the_same_trajectory(digits, tmp_path):
    kwargs = dict(epochs=4, batch_size=100, progress=False, restore_best=False, seed=3)
    # same initial weights for both: build both from one seed
    torch.manual_seed(0)
    straight2 = small_vae(digits)
    torch.manual_seed(0)
    resumed = small_vae(digits)
    pvae.fit(straight2, digits.train, digits.valid, run_dir=tmp_path / "b", **kwargs)
    pvae.fit(resumed, digits.train, digits.valid, run_dir=tmp_path / "c", **{**kwargs, "epochs": 2})
    torch.manual_seed(99)  # a fresh process: other weights, other global RNG; the checkpoint decides
    again = small_vae(digits)
    h3 = pvae.fit(again, digits.train, digits.valid, run_dir=tmp_path / "c", resume=True, **kwargs)
    for k, v in straight2.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    ref = load_checkpoint(tmp_path / "b" / CHECKPOINT_FILE)
    got = load_checkpoint(tmp_path / "c" / CHECKPOINT_FILE)
    for r_rec, g_rec in zip(ref["history"], got["history"]):
        assert r_rec["train_objective"] == g_rec["train_objective"]
        assert r_rec["val_elbo"] == g_rec["val_elbo"]
    assert len(h3.records) == 4
    lines = (tmp_path / "c" / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 4  # no duplicated epochs after resume


def test_existing_checkpoint_is_never_overwritten_without_resume(digits, tmp_path):
    vae = small_vae(digits)
    pvae.fit(vae, digits.train, epochs=1, run_dir=tmp_path, progress=False)
    digest = hashlib.sha256((tmp_path / CHECKPOINT_FILE).read_bytes()).hexdigest()
    with pytest.raises(FileExistsError, match="resume"):
        pvae.fit(vae, digits.train, epochs=2, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="cannot resume"):
        pvae.fit(vae, digits.train, epochs=2, lr=0.5, run_dir=tmp_path, resume=True, progress=False)
    assert hashlib.sha256((tmp_path / CHECKPOINT_FILE).read_bytes()).hexdigest() == digest


def test_two_models_in_one_process_are_independent(digits):
    a, b = small_vae(digits), small_vae(digits)
    assert not any(pa is pb for pa, pb in zip(a.parameters(), b.parameters()))
    pvae.fit(a, digits.train, epochs=1, progress=False)
    a_after = {k: v.clone() for k, v in a.state_dict().items()}
    b_before = {k: v.clone() for k, v in b.state_dict().items()}
    pvae.fit(b, digits.train, epochs=2, progress=False, seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, a_after[k]), f"training b changed a's {k}"
    assert any(not torch.equal(v, b_before[k]) for k, v in b.state_dict().items())
    assert len(pyro.get_param_store().keys()) == 0


def test_fit_restores_the_callers_rng(digits):
    vae = small_vae(digits)
    state = torch.get_rng_state()
    pvae.fit(vae, digits.train, epochs=1, progress=False)
    assert torch.equal(state, torch.get_rng_state())


def test_early_stopping_and_best_weights(digits, tmp_path):
    vae = small_vae(digits)
    history = pvae.fit(vae, digits.train[:200], digits.valid, epochs=400, lr=3e-3, patience=3,
                       progress=False, run_dir=tmp_path)
    assert history.stopped_early and len(history.records) < 400
    assert len(history.records) - history.best_epoch == 3
    best = load_checkpoint(tmp_path / CHECKPOINT_FILE)["best_model"]
    for k, v in vae.state_dict().items():
        assert torch.equal(v, best[k])  # the returned model holds the best epoch's weights


class _NaNAtStep:
    """An objective that returns NaN at a given call (simulates divergence)."""

    def __init__(self, inner, bad_call):
        self.inner, self.bad_call, self.calls = inner, bad_call, 0
        self.name, self.num_particles = inner.name, inner.num_particles

    def loss_and_value(self, vae, x, index=None, kl_weight=None):
        self.calls += 1
        loss, value = self.inner.loss_and_value(vae, x)
        if self.calls == self.bad_call:
            return loss * float("nan"), value * float("nan")
        return loss, value


class _NaNGradientAtStep(_NaNAtStep):
    """Finite loss, but a NaN gradient reaches one parameter at a given call."""

    def loss_and_value(self, vae, x, index=None, kl_weight=None):
        self.calls += 1
        loss, value = self.inner.loss_and_value(vae, x)
        if self.calls == self.bad_call:
            p = next(vae.decoder.parameters())
            loss = loss + torch.sqrt((p.sum() * 0).abs())  # adds 0; d sqrt at 0 = inf, times 0: NaN
            assert torch.isfinite(loss)
        return loss, value


def test_divergence_is_a_clear_error_that_loses_nothing(digits, tmp_path):
    vae = small_vae(digits)
    objective = _NaNAtStep(pvae.make_objective("elbo"), bad_call=12 + 5)  # epoch 2 (12 steps/epoch)
    with pytest.raises(FloatingPointError, match="epoch 2, step 5.*still holds epoch 1"):
        pvae.fit(vae, digits.train, epochs=3, objective=objective, run_dir=tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def test_interrupted_checkpoint_write_keeps_the_previous_file(digits, tmp_path, monkeypatch):
    vae = small_vae(digits)
    pvae.fit(vae, digits.train, epochs=1, run_dir=tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(3)}, f)  # something is written, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        pvae.fit(vae, digits.train, epochs=2, run_dir=tmp_path, resume=True, progress=False)
    monkeypatch.undo()
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, METRICS_FILE]


def test_fit_rejects_bad_arguments(digits):
    vae = small_vae(digits)
    with pytest.raises(ValueError, match="epochs"):
        pvae.fit(vae, digits.train, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        pvae.fit(vae, digits.train, lr=float("nan"))
    grey = pvae.load_dataset("digits-grey")
    with pytest.raises(ValueError, match="binary"):
        pvae.fit(vae, grey.train, epochs=1, progress=False)
    with pytest.raises(ValueError, match="validation data .*shape"):
        pvae.fit(vae, digits.train, digits.valid[:, :10], epochs=1, progress=False)


def test_a_nan_gradient_is_never_applied_and_is_reported_with_its_step(digits, tmp_path):
    """A finite loss with a NaN gradient: the update is skipped on the device (fused Adam's
    found_inf), the parameters stay finite, and fit names the step; with nonfinite='skip'
    the run goes on and the epoch's record counts the skipped step."""
    vae = small_vae(digits)
    objective = _NaNGradientAtStep(pvae.make_objective("elbo"), bad_call=3)
    with pytest.raises(FloatingPointError, match="epoch 1, step 3"):
        pvae.fit(vae, digits.train, epochs=1, objective=objective, progress=False)
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    vae = small_vae(digits)
    objective = _NaNGradientAtStep(pvae.make_objective("elbo"), bad_call=12 + 3)
    history = pvae.fit(vae, digits.train, epochs=2, objective=objective, progress=False, nonfinite="skip")
    assert "nonfinite_steps" not in history.records[0]
    assert history.records[1]["nonfinite_steps"] == 1 and history.records[1]["first_nonfinite_step"] == 3
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    assert all(math.isfinite(r["train_objective"]) for r in history.records)


def test_compiled_step_equals_the_eager_step_on_the_same_noise(digits):
    """TrainStep(mode='compile') trains the same as the eager step (inductor told to draw its
    random numbers as eager PyTorch does, so both see the same noise)."""
    import torch._inductor.config as inductor_config

    from pvae.train import TrainStep, _optimizer

    torch.manual_seed(0)
    a = small_vae(digits)
    b = small_vae(digits)
    b.load_state_dict(a.state_dict())
    x = digits.train[:64]
    steps = {m: TrainStep(v, pvae.make_objective("elbo"), _optimizer(v, 1e-2), m)
             for m, v in (("eager", a), ("compile", b))}
    old = inductor_config.fallback_random
    inductor_config.fallback_random = True
    try:
        for i in range(3):
            for mode, step in steps.items():
                with pvae._rng.seeded(i):
                    value, found_inf = step(x)
                assert float(found_inf) == 0
    finally:
        inductor_config.fallback_random = old
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_max_time_stops_after_an_epoch_and_resume_finishes_the_same_run(digits, tmp_path):
    kwargs = dict(epochs=3, batch_size=100, progress=False, restore_best=False, seed=5)
    torch.manual_seed(0)
    straight = small_vae(digits)
    torch.manual_seed(0)
    limited = small_vae(digits)
    pvae.fit(straight, digits.train, digits.valid, run_dir=tmp_path / "a", **kwargs)
    # a time limit that has run out after the first epoch: the call stops there, checkpointed
    first = pvae.fit(limited, digits.train, digits.valid, run_dir=tmp_path / "b", max_time=1e-9, **kwargs)
    assert len(first.records) == 1 and first.time_limit_reached and not first.stopped_early
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT_FILE)["epoch"] == 1
    rest = pvae.fit(limited, digits.train, digits.valid, run_dir=tmp_path / "b", resume=True, **kwargs)
    assert len(rest.records) == 3 and not rest.time_limit_reached
    for k, v in straight.state_dict().items():
        assert torch.equal(v, limited.state_dict()[k]), k
    with pytest.raises(pvae.UsageError, match="max_time"):
        pvae.fit(limited, digits.train, epochs=1, max_time=0, progress=False)


def test_validation_on_the_importance_weighted_bound(digits, tmp_path):
    """val_bound="iwae": the validation metric is L_K with K = val_num_samples (at least the ELBO
    of the same draws, and what early stopping and the best model follow); a run resumes only
    with the same metric."""
    vae = small_vae(digits)
    history = pvae.fit(vae, digits.train, digits.valid, epochs=2, val_num_samples=8, val_bound="iwae",
                       run_dir=tmp_path, progress=False)
    assert history.val_metric == "val_iwae" and history.best_val == max(r["val_iwae"] for r in history.records)
    last = pvae.evaluate_bounds(vae, digits.valid, 8, seed=0)
    assert history.records[-1]["val_iwae"] == pytest.approx(last["iwae"].mean) or history.best_epoch != 2
    assert last["iwae"].mean > last["elbo"].mean
    with pytest.raises(pvae.UsageError, match="cannot resume"):
        pvae.fit(vae, digits.train, digits.valid, epochs=3, val_num_samples=8, run_dir=tmp_path, resume=True,
                 progress=False)
    with pytest.raises(pvae.UsageError, match="val_bound"):
        pvae.fit(vae, digits.train, epochs=1, val_bound="naive", progress=False)
