"""pvae's Pyro program computes exactly the hand-written PyTorch VAE of the benchmarks.

Same initial weights and the same noise give the same losses step after step, so the
benchmark compares like with like and differences in experiments are seed noise.
"""

import sys
from pathlib import Path

import torch

import pvae

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from handwritten_vae import HandwrittenVAE  # noqa: E402


def linears(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_same_weights_and_noise_give_the_same_training_trajectory():
    d, latent, hidden = 40, 5, (30, 20)
    vae = pvae.build_vae(pvae.RunConfig(latent_dim=latent, net={'hidden': hidden}), d)
    hand = HandwrittenVAE(d, latent, hidden)
    for src, dst in zip(linears(vae.guide_net) + linears(vae.decoder), linears(hand.encoder) + linears(hand.decoder)):
        dst.load_state_dict(src.state_dict())
    objective = pvae.make_objective("elbo")
    opt_p = torch.optim.Adam(vae.parameters(), lr=1e-2)
    opt_h = torch.optim.Adam(hand.parameters(), lr=1e-2)
    data = (torch.rand(10, 16, d) < 0.3).float()
    for step, x in enumerate(data):
        torch.manual_seed(step)
        loss_p, value_p = objective.loss_and_value(vae, x)
        torch.manual_seed(step)
        loss_h = hand.loss(x)
        torch.testing.assert_close(loss_p, loss_h, rtol=1e-5, atol=1e-4)
        # the logged value is the hand-written ELBO on the same noise (not pvae's own surrogate)
        torch.testing.assert_close(value_p, -loss_h.detach(), rtol=1e-5, atol=1e-4)
        for opt, loss in ((opt_p, loss_p), (opt_h, loss_h)):
            opt.zero_grad()
            loss.backward()
            opt.step()
