"""Faults lose nothing: killed runs resume bit-identically, damaged checkpoints are detected,
and two processes never train into one run directory."""

import signal
import subprocess
import sys
import time

import pytest
import torch

import pvae
from pvae.checkpoint import CorruptCheckpointError, RunLockedError, load_checkpoint, run_lock, save_checkpoint

TRAIN = ["-m", "pvae.cli", "train", "--dataset", "digits", "--latent-dim", "2", "--hidden", "256,256",
         "--epochs", "5", "--batch-size", "10", "--patience", "none", "--no-progress"]


def _epochs_logged(run_dir) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _train(run_dir, *extra, kill_at=None):
    """Run `pvae train`; with ``kill_at = (epochs_logged, extra_seconds)``, SIGKILL it that long
    after it has logged that many epochs (0: during start-up). Returns whether it was killed."""
    proc = subprocess.Popen([sys.executable, *TRAIN, "--run-dir", str(run_dir), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_at is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        return False
    epochs, delay = kill_at
    deadline = time.monotonic() + 300
    while _epochs_logged(run_dir) < epochs and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:  # finished before the kill
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_sigkill_at_any_moment_then_resume_ends_bit_identical(tmp_path):
    """SIGKILL `pvae train` during start-up, mid-epoch and around a checkpoint write, then resume
    with --resume: the run continues from its last complete epoch and ends with the same
    parameters, bit for bit, as an uninterrupted run (CPU)."""
    _train(tmp_path / "reference")
    reference = load_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    killed = 0
    for i, kill_at in enumerate(((0, 1.0), (1, 0.3), (3, 0.0))):
        run = tmp_path / f"killed{i}"
        killed += _train(run, kill_at=kill_at)
        if (run / "checkpoint.pt").exists():
            load_checkpoint(run / "checkpoint.pt")  # never truncated: atomic write
        _train(run, "--resume")
        resumed = load_checkpoint(run / "checkpoint.pt")
        assert resumed["epoch"] == reference["epoch"] == 5
        for key, value in reference["model"].items():
            assert torch.equal(value, resumed["model"][key]), f"kill at {kill_at}: {key} differs"
        assert resumed["history"][-1]["train_objective"] == reference["history"][-1]["train_objective"]
    assert killed == 3, "a run finished before its kill"


def test_a_damaged_checkpoint_is_detected(tmp_path, capsys, digits):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.arange(1000.0)}, "epoch": 3}, path)
    assert load_checkpoint(path)["epoch"] == 3
    data = bytearray(path.read_bytes())
    damaged = tmp_path / "flipped.pt"
    data[len(data) // 2] ^= 0xFF  # one byte inside the sealed payload
    damaged.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="SHA-256|not a readable checkpoint"):
        load_checkpoint(damaged)
    # a file that still parses, with one value of the sealed payload altered: only the checksum sees it
    outer = torch.load(path, weights_only=True)
    payload = bytearray(outer["payload"])
    payload[payload.index(torch.arange(1000.0)[500:502].numpy().tobytes())] ^= 0x01
    torch.save({**outer, "payload": bytes(payload)}, tmp_path / "altered.pt")
    with pytest.raises(CorruptCheckpointError, match="fails its SHA-256 check"):
        load_checkpoint(tmp_path / "altered.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupted"):
        load_checkpoint(truncated)
    # a resume from a damaged run fails with the usage-error exit code and one line
    from pvae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--latent-dim", "2", "--hidden", "16", "--epochs", "1", "--run-dir", str(run),
                 "--no-progress"]) == 0
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-200])
    capsys.readouterr()
    assert main(["train", "--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--run-dir", str(run),
                 "--resume", "--no-progress"]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err


def test_a_second_process_cannot_train_into_a_locked_run_directory(tmp_path):
    config = pvae.RunConfig(latent_dim=2, net={'hidden': (16,)}, training={'epochs': 1})
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match="in use by another pvae process"):
            pvae.train_run(config, tmp_path / "run", progress=False)
    pvae.train_run(config, tmp_path / "run", progress=False)  # released: trains
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def _small_run(digits, run_dir, epochs):
    config = pvae.RunConfig(latent_dim=2, net={"hidden": (16,)}, training={"epochs": epochs, "patience": None})
    return pvae.train_run(config, run_dir, progress=False, dataset=digits, resume=(run_dir / "config.json").exists())


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, digits, monkeypatch):
    """The write fails with ENOSPC after part of the file is out: the previous checkpoint is byte
    for byte what it was, no temporary file is left, the error says what happened and what to do,
    and the run resumes once there is space again."""
    import errno
    import os

    run_dir = tmp_path / "run"
    _small_run(digits, run_dir, 1)
    before = (run_dir / "checkpoint.pt").read_bytes()
    real_fsync = os.fsync

    def full(fd):  # only the checkpoint's temporary file meets a full disk
        if ".checkpoint.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)  # the bytes went to the page cache; the flush fails
    with pytest.raises(pvae.DiskFullError, match="no space left.*previous checkpoint.pt is intact.*--resume"):
        _small_run(digits, run_dir, 2)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(_small_run(digits, run_dir, 2).history.records) == 2


def test_a_real_full_file_system_keeps_the_previous_checkpoint(tmp_path, digits):
    """The same on a real 2 MiB tmpfs (needs root and mount; skipped where unavailable), filled
    with ballast after the first epoch so that half a checkpoint fits."""
    import shutil

    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run_dir = mount_point / "run"
        config = pvae.RunConfig(latent_dim=2, net={"hidden": (64,)}, training={"epochs": 1, "patience": None})
        pvae.train_run(config, run_dir, progress=False, dataset=digits)
        before = (run_dir / "checkpoint.pt").read_bytes()
        ballast = mount_point / "ballast"
        free = shutil.disk_usage(mount_point).free
        ballast.write_bytes(b"\0" * max(free - len(before) // 2, 0))  # room for half a checkpoint
        with pytest.raises(pvae.DiskFullError, match="previous checkpoint.pt is intact"):
            pvae.train_run(config.replace(training={"epochs": 2}), run_dir, resume=True, progress=False,
                           dataset=digits)
        assert (run_dir / "checkpoint.pt").read_bytes() == before
        ballast.unlink()
        assert len(pvae.train_run(config.replace(training={"epochs": 2}), run_dir, resume=True,
                                  progress=False, dataset=digits).history.records) == 2
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)
