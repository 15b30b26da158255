"""GPU paths. These run only where CUDA is available (the CPU CI skips them)."""

import torch

import pvae
from pvae.checkpoint import load_checkpoint

from conftest import requires_cuda


@requires_cuda
def test_training_on_cuda_and_loading_the_run_on_cpu(tmp_path, digits):
    config = pvae.RunConfig(latent_dim=2, hidden=(32,), epochs=2, device="cuda")
    vae, history = pvae.train_run(config, tmp_path / "run", progress=False, dataset=digits)
    assert all(p.device.type == "cuda" for p in vae.parameters())
    assert all(b.device.type == "cuda" for b in vae.buffers())
    assert vae.sample(4, seed=0).device.type == "cuda"
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    _, on_cpu = pvae.load_run(tmp_path / "run", device="cpu")
    x = digits.test[:16]
    torch.testing.assert_close(on_cpu.encode(x), vae.encode(x.cuda()).cpu(), rtol=1e-4, atol=1e-5)
    report = pvae.evaluate_run(tmp_path / "run", num_samples=5, device="cuda", progress=False, write=False)
    assert report["estimates"]["iwae"]["num_samples"] == 5


@requires_cuda
def test_resume_on_cuda_continues_the_same_trajectory(tmp_path, digits):
    def build():
        torch.manual_seed(0)
        return pvae.build_vae(pvae.RunConfig(latent_dim=2, hidden=(32,)), digits.data_dim)

    kw = dict(batch_size=100, progress=False, restore_best=False, device="cuda")
    a = build()
    pvae.fit(a, digits.train, digits.valid, epochs=3, run_dir=tmp_path / "a", **kw)
    b = build()
    pvae.fit(b, digits.train, digits.valid, epochs=1, run_dir=tmp_path / "b", **kw)
    c = build()
    pvae.fit(c, digits.train, digits.valid, epochs=3, run_dir=tmp_path / "b", resume=True, **kw)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, c.state_dict()[k], rtol=1e-4, atol=1e-5)  # cuBLAS may reorder sums
