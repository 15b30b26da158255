"""fit's callbacks: a user's own callback (README), resumable callback state, bounded skipping of
non-finite steps, the progress bar on an early stop, and the loop's own checks."""

import math
import re
from pathlib import Path

import pytest
import torch

import pvae
from pvae.checkpoint import load_checkpoint
from pvae.training.callbacks import Callback, ProgressBar
from pvae.training.loop import CHECKPOINT_FILE

SMALL = pvae.RunConfig(latent_dim=4, net={"hidden": (32,)})


def small_vae(data):
    return pvae.build_vae(SMALL, data.data_dim)


class _NaNWhen:
    """An objective (the ELBO) whose loss is NaN at the calls ``bad(call)`` says (1-based)."""

    def __init__(self, bad):
        self.inner, self.bad, self.calls = pvae.make_objective("elbo"), bad, 0
        self.name, self.num_particles = self.inner.name, self.inner.num_particles

    def loss_and_value(self, vae, x, index=None, kl_weight=None):
        self.calls += 1
        loss, value = self.inner.loss_and_value(vae, x)
        return (loss * math.nan if self.bad(self.calls) else loss), value


class _StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, loop, record):
        if loop.epoch == self.epoch:
            loop.stop(f"asked to stop at epoch {self.epoch}")


class _Counter(Callback):
    state_key = "counter"

    def __init__(self):
        self.epochs = self.steps = 0

    def on_step_end(self, loop, step, value, nonfinite):
        self.steps += 1

    def on_epoch_end(self, loop, record):
        self.epochs += 1
        record["counted_epochs"] = self.epochs

    def state_dict(self):
        return {"epochs": self.epochs, "steps": self.steps}

    def load_state_dict(self, state):
        self.epochs, self.steps = state["epochs"], state["steps"]


def test_the_readmes_callback_logs_a_metric_and_stops_the_run(digits):
    """README's KLWatch runs as written: its metric is in every record, its condition stops the run
    (stop_reason says why), and its state is saved in the checkpoint under its key."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Training options"):]
    section = section[: section.index("\n## ", 10)]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    data = pvae.Dataset("digits", digits.train, digits.valid, digits.test)
    namespace = {"pvae": pvae, "vae": small_vae(digits), "data": data}
    code = block.replace("epochs=100", "epochs=30, batch_size=50, progress=False")
    exec(compile(code, "README.md", "exec"), namespace)
    history = namespace["history"]
    assert all(r["kl_weight_x10"] == pytest.approx(10.0) for r in history.records)
    # the digits model passes -25 nats within 30 epochs (measured: epoch 8 to 12); the run stops there
    assert history.stop_reason == "validation ELBO above -25 nats"
    assert len(history.records) < 30 and history.records[-1]["val_elbo"] > -25
    assert all(r["val_elbo"] <= -25 for r in history.records[:-1])


def test_a_callbacks_state_resumes_with_the_run(digits, tmp_path):
    """A callback with a state_key: its state goes into checkpoint.pt and comes back on resume, so
    an interrupted run counts what an uninterrupted one counts."""
    vae = small_vae(digits)
    first = _Counter()
    pvae.fit(vae, digits.train, epochs=2, run_dir=tmp_path, progress=False, callbacks=[first])
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["counter"] == {"epochs": 2, "steps": 24}
    second = _Counter()
    history = pvae.fit(vae, digits.train, epochs=3, run_dir=tmp_path, resume=True, progress=False,
                       callbacks=[second])
    assert (second.epochs, second.steps) == (3, 36)  # 12 steps per epoch
    assert [r["counted_epochs"] for r in history.records] == [1, 2, 3]


def test_skipping_non_finite_steps_is_bounded(digits):
    """nonfinite='skip' with every step NaN used to skip forever; it now stops after
    max_skipped_steps in a row, naming the first, with the parameters untouched."""
    vae = small_vae(digits)
    before = [p.detach().clone() for p in vae.parameters()]
    with pytest.raises(pvae.DivergenceError, match=r"5 consecutive training steps .*\(from step 1 of the run, epoch 1\)"):
        pvae.fit(vae, digits.train, epochs=50, objective=_NaNWhen(lambda call: True), progress=False, nonfinite="skip",
                 max_skipped_steps=5)
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), before))


def test_skipped_steps_that_are_not_consecutive_do_not_stop_the_run(digits):
    """Every third step NaN: skipped and counted, never 3 in a row, so the run ends normally."""
    history = pvae.fit(small_vae(digits), digits.train, epochs=2, objective=_NaNWhen(lambda call: call % 3 == 0), progress=False,
                       nonfinite="skip", max_skipped_steps=2)
    assert [r["nonfinite_steps"] for r in history.records] == [4, 4]
    assert history.stop_reason is None


def test_the_progress_bar_ends_full_when_the_run_stops_early(digits):
    bar = ProgressBar()
    history = pvae.fit(small_vae(digits), digits.train, epochs=5, progress=False, callbacks=[bar, _StopAt(2)])
    assert history.stop_reason == "asked to stop at epoch 2" and len(history.records) == 2
    assert bar.bar.n == bar.bar.total == 24


def test_callbacks_are_checked(digits):
    class Clash(Callback):
        state_key = "model"  # the loop's own key

    with pytest.raises(pvae.UsageError, match="state_key"):
        pvae.fit(small_vae(digits), digits.train, epochs=1, progress=False, callbacks=[Clash()])
    with pytest.raises(TypeError, match="Callback"):
        pvae.fit(small_vae(digits), digits.train, epochs=1, progress=False, callbacks=[lambda loop: None])
    with pytest.raises(pvae.UsageError, match="fit does not take bogus"):
        pvae.fit(small_vae(digits), digits.train, bogus=1)


def test_fit_takes_one_training_object_and_keywords_override_it(digits):
    training = pvae.Training(epochs=2, batch_size=50, patience=None, lr=1e-3)
    history = pvae.fit(small_vae(digits), digits.train, training=training, progress=False)
    assert len(history.records) == 2
    history = pvae.fit(small_vae(digits), digits.train, training=training, epochs=1, progress=False)
    assert len(history.records) == 1


def test_a_mid_epoch_check_names_the_first_bad_step(digits):
    """check_every=2 with the third step NaN: raise mode stops at the step-4 check (not at the end
    of the epoch), naming step 3 and counting 1 of the first 4 steps."""
    with pytest.raises(pvae.DivergenceError, match=r"epoch 1, step 3 \(1 of the first 4 steps"):
        pvae.fit(small_vae(digits), digits.train, epochs=1, objective=_NaNWhen(lambda call: call == 3),
                 progress=False, check_every=2)
