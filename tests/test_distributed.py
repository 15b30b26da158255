"""Data-parallel training and sharded evaluation on torch.distributed: two gloo processes
launched by torchrun, compared with one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import pvae
from pvae import distributed
from pvae._rng import seeded
from pvae.checkpoint import load_checkpoint

TRAIN = ["train", "--dataset", "digits", "--latent-dim", "4", "--hidden", "32", "--no-progress"]


def _torchrun(args, nproc=2, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pvae", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _one_process(args):
    """``pvae <args>`` in this process, with one intra-op thread as the torchrun workers have: the
    one-process reference, without a process start (2-3 s) per run."""
    from pvae.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(list(args)) == 0
    finally:
        torch.set_num_threads(threads)


def _params(run):
    return load_checkpoint(run / "checkpoint.pt")["model"]


def test_two_gloo_processes_take_the_one_process_step(tmp_path):
    """The deterministic autoencoder (no sampling noise): global batch 64 split over two processes,
    each loss weighted by its share (the last minibatch of 1197 % 64 = 45 splits 23/22), gives the
    one-process parameters after two epochs (38 steps) up to float32 rounding."""
    args = [*TRAIN, "--model", "autoencoder", "--epochs", "2", "--batch-size", "64"]
    _torchrun([*args, "--run-dir", str(tmp_path / "two")])
    _one_process([*args, "--run-dir", str(tmp_path / "one")])
    one, two = _params(tmp_path / "one"), _params(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)
    init = _params_at_init(tmp_path)
    moved = max(float((one[name] - init[name]).abs().max()) for name in one if one[name].is_floating_point())
    assert moved > 1e-2  # it trained: the tolerance is small against how far the parameters moved
    env = json.loads((tmp_path / "two" / "env.json").read_text())
    assert env["world_size"] == 2 and env["distributed_backend"] == "gloo"


def _params_at_init(tmp_path):
    """The same config's initial weights (to see that training moved them)."""
    config = pvae.RunConfig.load(tmp_path / "one" / "config.json")
    with seeded(config.training.seed):
        return pvae.build_vae(config, 64).state_dict()


def test_a_data_parallel_vae_resumes_on_its_own_streams(tmp_path, capsys):
    """A VAE (each process draws its own noise): two epochs, then two more with --resume, end
    with the parameters of four epochs in one go; the checkpoint holds both processes' random
    states, and resuming it with another number of processes is refused."""
    args = [*TRAIN, "--batch-size", "100"]
    _torchrun([*args, "--epochs", "4", "--run-dir", str(tmp_path / "straight")])
    _torchrun([*args, "--epochs", "2", "--run-dir", str(tmp_path / "resumed")])
    assert len(load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["rng"]["ranks"]) == 2
    shutil.copytree(tmp_path / "resumed", tmp_path / "copy")
    _torchrun([*args, "--epochs", "4", "--resume", "--run-dir", str(tmp_path / "resumed")])
    straight, resumed = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    history = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["history"]
    assert history[-1]["val_elbo"] > history[0]["val_elbo"] + 3  # it learns (measured: -41 -> -33)
    from pvae.cli import main

    assert main([*args, "--epochs", "4", "--resume", "--run-dir", str(tmp_path / "copy")]) == 2
    assert "written by 2 processes" in capsys.readouterr().err


def test_sharded_evaluation_reports_what_one_process_reports(tmp_path):
    run = tmp_path / "run"
    _one_process([*TRAIN, "--epochs", "2", "--run-dir", str(run)])
    args = ["evaluate", str(run), "--num-samples", "50", "--estimators", "elbo,iwae,naive,ais", "--ais-steps", "4",
            "--chains", "3", "--batch-size", "70", "--psis-datapoints", "0", "--no-progress"]
    _torchrun(args)
    sharded = json.loads((run / "evaluation-test-K50.json").read_text())
    (run / "evaluation-test-K50.json").unlink()
    _one_process(args)
    single = json.loads((run / "evaluation-test-K50.json").read_text())
    sharded.pop("figure"), single.pop("figure")
    # the environment says how it ran (two processes, or one; when): the rest must not differ
    sharded_env, single_env = sharded.pop("environment"), single.pop("environment")
    assert (sharded_env["world_size"], single_env["world_size"]) == (2, 1)
    assert sharded == single  # every estimate, standard error and per-label summary
    assert set(single["estimates"]) >= {"elbo", "iwae", "naive", "ais"}


def test_a_refusal_in_one_process_stops_all_of_them_with_one_message(tmp_path):
    run = tmp_path / "run"
    _one_process([*TRAIN, "--epochs", "1", "--run-dir", str(run)])
    proc = _torchrun([*TRAIN, "--epochs", "1", "--run-dir", str(run)], check=False)
    assert proc.returncode != 0 and proc.stderr.count("already holds a run") == 1


def test_objectives_that_are_not_a_mean_over_datapoints_are_refused_in_every_process(tmp_path):
    """InfoVAE's MMD is a statistic of the whole minibatch: the processes' shares would optimise
    another objective. Refused before anything is written, one message."""
    run = tmp_path / "run"
    proc = _torchrun([*TRAIN, "--epochs", "1", "--objective", "infovae", "--run-dir", str(run)], check=False)
    assert proc.returncode != 0 and proc.stderr.count("not a mean over datapoints") == 1
    proc = _torchrun([*TRAIN, "--epochs", "1", "--batch-size", "1", "--run-dir", str(run)], check=False)
    assert proc.returncode != 0 and proc.stderr.count("smaller than the 2 processes") == 1
    assert not (run / "config.json").exists()  # nothing written (the lock file aside)


def test_shares_weight_uneven_minibatches_to_the_global_mean():
    """Outside a process group nothing is sharded; the weights make the average of the processes'
    weighted means the global minibatch's mean, whatever the split."""
    idx = torch.arange(45)
    assert distributed.shard(idx) == (idx, 1.0)
    values = torch.randn(45)
    parts = idx.tensor_split(2)
    weights = [p.numel() * 2 / 45 for p in parts]
    averaged = sum(w * values[p].mean() for w, p in zip(weights, parts)) / 2
    torch.testing.assert_close(averaged, values.mean())
    assert distributed.batch_seed(7, 0) == 7 and distributed.batch_seed(None, 3) is None
    assert len({distributed.batch_seed(7, i) for i in range(1, 100)}) == 99


def test_leaving_the_group_frees_what_holds_the_backend_before_destroying_it(tmp_path, monkeypatch):
    """A DDP wrapper left as cyclic garbage by training holds the gloo backend; destroyed only at
    interpreter exit, with its threads running, the backend aborted one rank of a finished torchrun
    run (CI: "terminate called without an active exception", SIGABRT). shutdown_if_ours frees such
    garbage while the group still exists, then destroys the group."""
    import gc
    import weakref

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(distributed, "_OURS", True)

    class Holder:  # a reference cycle, as the training step's bound method makes
        pass

    holder = Holder()
    holder.me = holder
    holder.ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    holder.ddp(torch.randn(4, 3)).sum().backward()
    alive = weakref.ref(holder.ddp)
    seen = {}
    destroy = dist.destroy_process_group

    def spy(*args, **kwargs):
        seen["ddp alive at destroy"] = alive() is not None
        return destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "destroy_process_group", spy)
    gc.disable()  # (no automatic collection in between: only shutdown_if_ours may free it)
    try:
        del holder
        assert alive() is not None  # cyclic garbage, not yet freed
        distributed.shutdown_if_ours()
    finally:
        gc.enable()
        if dist.is_initialized():
            destroy()
    assert seen == {"ddp alive at destroy": False}
    assert not dist.is_initialized()


def test_a_process_that_finished_cleanly_leaves_even_when_its_peer_failed(tmp_path):
    """Rank 0 fails in code only it runs (say, writing figures) and leaves without waiting; rank 1
    finished cleanly and waits at the exit barrier. Rank 1 must still leave the group and exit 0
    (the failure is rank 0's to report), not die at the barrier with its backend left to exit."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import sys, torch.distributed as dist\n"
        "from pvae import distributed\n"
        "distributed.init_from_env('cpu')\n"
        "rank = dist.get_rank()\n"
        "distributed.shutdown_if_ours(wait=rank == 1)\n"
        "assert not dist.is_initialized()\n"
        "print(f'rank {rank} left', flush=True)\n"
        "sys.exit(3 if rank == 0 else 0)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--tee=3", str(script)], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "rank 1 left" in out, out[-3000:]
    assert "exitcode  : 3" in out, out[-3000:]  # rank 0's failure is the one reported


@pytest.mark.parametrize("family", [["--model", "hvae", "--levels", "2"], ["--model", "m2", "--labelled", "100"],
                                    ["--model", "cvae"]])
def test_each_model_family_trains_and_evaluates_on_two_processes(tmp_path, family):
    """A family's covariates (labels, M2's mask of known labels) are sharded with the data: two
    processes train one epoch and evaluate sharded, as one process would (finite bounds, the
    report's datapoints all there)."""
    run = tmp_path / "run"
    _torchrun([*TRAIN, *family, "--epochs", "1", "--run-dir", str(run)])
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2
    _torchrun(["evaluate", str(run), "--num-samples", "3", "--no-progress"])
    report = json.loads((run / "evaluation-test-K3.json").read_text())
    assert report["num_datapoints"] == 300 and all(
        abs(v["mean"]) < 1e4 for v in report["estimates"].values())
    if family[1] == "m2":
        assert report["classification"]["num_datapoints"] == 300
