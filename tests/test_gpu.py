"""GPU paths. These run only where CUDA is available (the CPU CI skips them)."""

import pytest
import torch

import pvae
from pvae.checkpoint import load_checkpoint

from conftest import requires_cuda


@requires_cuda
def test_training_on_cuda_and_loading_the_run_on_cpu(tmp_path, digits):
    config = pvae.RunConfig(latent_dim=2, net={'hidden': (32,)}, training={'epochs': 2, 'device': 'cuda'})
    vae = pvae.train_run(config, tmp_path / "run", progress=False, dataset=digits).vae
    assert all(p.device.type == "cuda" for p in vae.parameters())
    assert all(b.device.type == "cuda" for b in vae.buffers())
    assert vae.sample(4, seed=0).device.type == "cuda"
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    on_cpu = pvae.load_run(tmp_path / "run", device="cpu").vae
    x = digits.test[:16]
    torch.testing.assert_close(on_cpu.encode(x), vae.encode(x.cuda()).cpu(), rtol=1e-4, atol=1e-5)
    report = pvae.evaluate_run(tmp_path / "run", num_samples=5, device="cuda", progress=False, write=False)
    assert report.estimates["iwae"].num_samples == 5


@requires_cuda
def test_resume_on_cuda_continues_the_same_trajectory(tmp_path, digits):
    def build():
        torch.manual_seed(0)
        return pvae.build_vae(pvae.RunConfig(latent_dim=2, net={'hidden': (32,)}), digits.data_dim)

    kw = dict(batch_size=100, progress=False, restore_best=False, device="cuda")
    a = build()
    pvae.fit(a, digits.train, digits.valid, epochs=3, run_dir=tmp_path / "a", **kw)
    b = build()
    pvae.fit(b, digits.train, digits.valid, epochs=1, run_dir=tmp_path / "b", **kw)
    c = build()
    pvae.fit(c, digits.train, digits.valid, epochs=3, run_dir=tmp_path / "b", resume=True, **kw)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, c.state_dict()[k], rtol=1e-4, atol=1e-5)  # cuBLAS may reorder sums


@requires_cuda
def test_a_scheduled_learning_rate_reaches_the_cuda_graph_after_a_resume(tmp_path, digits):
    """The fused Adam of a CUDA-graph step reads its learning rate from a device tensor: a resumed
    run must keep that tensor (not the checkpoint's copy), or the schedule stops at the resume."""
    def build():
        torch.manual_seed(0)
        return pvae.build_vae(pvae.RunConfig(latent_dim=2, net={'hidden': (32,)}), digits.data_dim)

    kw = dict(batch_size=100, progress=False, restore_best=False, device="cuda", lr=3e-3, lr_schedule="step",
              lr_step=1, lr_gamma=0.3)
    a = build()
    pvae.fit(a, digits.train, digits.valid, epochs=4, run_dir=tmp_path / "a", **kw)
    c = build()
    pvae.fit(c, digits.train, digits.valid, epochs=4, run_dir=tmp_path / "b", max_time=1e-9, **kw)
    c = build()
    pvae.fit(c, digits.train, digits.valid, epochs=4, run_dir=tmp_path / "b", resume=True, **kw)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, c.state_dict()[k], rtol=1e-4, atol=1e-5)


@requires_cuda
def test_non_fused_optimizers_step_eagerly_on_cuda(digits):
    vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, net={'hidden': (32,)}), digits.data_dim)
    history = pvae.fit(vae, digits.train, epochs=1, optimizer="sgd", lr=0.05, progress=False, device="cuda")
    assert history.records[-1]["train_objective"] == history.records[-1]["train_objective"]  # trained, no NaN


@requires_cuda
def test_train_steps_never_synchronise_with_the_host(digits):
    """The eager and the CUDA-graph TrainStep run under torch's sync debug mode 'error'."""
    from pvae.train import TrainStep, _optimizer

    x = digits.train[:100].cuda()
    for mode in ("eager", "cuda-graph"):
        vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, net={'hidden': (32,)}), digits.data_dim).cuda()
        step = TrainStep(vae, pvae.make_objective("elbo"), _optimizer(vae, 1e-3), mode)
        step(x)  # first call: capture (allowed to synchronise)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                value, found_inf = step(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert float(found_inf) == 0 and torch.isfinite(value)


@requires_cuda
def test_cuda_graph_fit_trains_like_eager_and_handles_the_last_partial_batch(digits):
    histories = {}
    for mode in ("eager", "cuda-graph"):
        torch.manual_seed(0)
        vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, net={'hidden': (32,)}), digits.data_dim)
        # 1197 training images in batches of 100: the 12th minibatch has 97 (runs eagerly)
        histories[mode] = pvae.fit(vae, digits.train, epochs=5, batch_size=100, device="cuda", step=mode,
                                   progress=False)
    eager, graph = histories["eager"].train_objective, histories["cuda-graph"].train_objective
    assert graph[-1] > graph[0] + 1.0, "the graphed step did not train"
    assert abs(graph[-1] - eager[-1]) < 1.0


@requires_cuda
@pytest.mark.parametrize("objective", ["elbo-analytic-kl", "iwae"])
def test_the_cuda_graph_step_follows_the_warmup_weight_it_is_given(digits, objective):
    """The graph is captured at weight 1 and reads the weight from a static tensor at each replay:
    its value at weight 0 must be eager's at weight 0, not its own at weight 1. With the guide's
    parameters scaled by 4 (a guide far from the prior) the two weights' values differ by about
    10 nats; one step's value varies by at most ~0.08 (CPU, both objectives), so a difference of two
    20-step means has an s.e. of ~0.025 and the 0.25 tolerance is ~10 s.e. (lr 0: nothing moves)."""
    from pvae.train import TrainStep, _optimizer

    torch.manual_seed(0)
    vae = pvae.build_vae(pvae.RunConfig(latent_dim=2, net={'hidden': (32,)}), digits.data_dim).cuda()
    with torch.no_grad():
        for p in vae.guide_net.parameters():
            p.mul_(4.0)
    chosen = pvae.make_objective(objective, **({"num_particles": 5} if objective == "iwae" else {}), kl_warmup=10)
    x = digits.train[:100].cuda()
    means = {}
    for mode in ("eager", "cuda-graph"):
        step = TrainStep(vae, chosen, _optimizer(vae, 0.0), mode)
        for weight in (0.0, 1.0):
            means[mode, weight] = sum(float(step(x, kl_weight=weight)[0]) for _ in range(20)) / 20
    assert abs(means["cuda-graph", 0.0] - means["eager", 0.0]) < 0.25, means
    assert abs(means["cuda-graph", 1.0] - means["eager", 1.0]) < 0.25, means
    assert means["cuda-graph", 0.0] - means["cuda-graph", 1.0] > 5.0, means
