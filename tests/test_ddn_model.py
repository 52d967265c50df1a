"""fastcomp.models.DDN: encode/decode round trip, shapes, training, guided sampling with the scorers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcomp.ddn import SplitAndPrune
from fastcomp.models import DDN, ColorHintScorer, InpaintingScorer, SuperResolutionScorer
from helpers import assert_close


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: see conftest.one_thread


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(channels=1, image_size=8, k=6, layers_per_stage=[1, 2, 2], width=8)
    args.update(kw)
    return DDN(**args)


def images(n=5, c=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g)


def test_layout():
    m = tiny()
    assert m.layer_resolutions == [2, 4, 4, 8, 8] and m.num_layers == 5
    assert len(m.ddls) == 5 and all(d.k == 6 for d in m.ddls)
    with pytest.raises(ValueError, match="resolutions"):
        DDN(image_size=8, resolutions=[4, 2, 8])
    with pytest.raises(ValueError, match="layers_per_stage"):
        DDN(image_size=8, layers_per_stage=[1, 1])


def test_encode_decode_round_trip_equals_reconstruct():
    m = tiny(channels=3)
    x = images(c=3)
    latent = m.encode(x)
    assert latent.shape == (5, 5) and latent.dtype == torch.int64
    assert ((latent >= 0) & (latent < 6)).all()
    recon = m.reconstruct(x)
    assert_close(m.decode(latent), recon, ratio=1e-6, name="decode(encode(x))")
    # encode is deterministic and counts nothing
    assert torch.equal(m.encode(x), latent)
    assert all(int(d.hits.sum()) == 0 for d in m.ddls)


def test_encode_keeps_the_nearest_candidate_at_every_layer():
    m = tiny()
    x = images()
    targets, latent = m.targets(x), m.encode(x)
    checked = []

    def pick(l, ddl, h, prev):  # replays the generator loop along the latent, checking each choice
        cand = ddl.candidates(h, prev)  # [B, K, C, r, r]
        dist = (cand - targets[l][:, None]).square().flatten(2).mean(2)
        assert torch.equal(dist.argmin(1), latent[:, l]), f"layer {l}"
        checked.append(l)
        return ddl(h, prev, index=latent[:, l])

    with torch.no_grad():
        m._run(x.shape[0], pick)
    assert checked == list(range(m.num_layers))


def test_sample_shapes_and_reproducibility():
    m = tiny(channels=3)
    s, z = m.sample(4, generator=torch.Generator().manual_seed(1), return_latent=True)
    assert s.shape == (4, 3, 8, 8) and z.shape == (4, 5)
    s2 = m.sample(4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s, s2)
    assert_close(m.decode(z), s, ratio=1e-6, name="decode(sample latent)")


def test_training_lowers_the_loss_and_split_and_prune_runs():
    m = tiny(chain_dropout=0.1)
    x = images(32)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    sp = SplitAndPrune(m.ddls, opt, interval=5, perturb=0.05)
    first = float(m(x, train=False).loss.detach())
    for _ in range(30):
        m.training_step(x, opt, sp)
    assert float(m(x, train=False).loss.detach()) < first
    assert sp.step_count == 30
    assert sp.counts(0).sum().item() == 32 * 30  # every training image counted once per layer


def test_hits_are_counted_in_training_mode_only():
    m = tiny()
    x = images(4)
    m.train()
    m(x)
    assert all(int(d.hits.sum()) == 4 for d in m.ddls)
    m.eval()
    m(x)
    assert all(int(d.hits.sum()) == 4 for d in m.ddls)


def _train_briefly(m, steps=40):
    x = images(64, seed=3)
    x = F.interpolate(F.avg_pool2d(x, 4), size=(8, 8), mode="bilinear", align_corners=False)  # smooth data
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(steps):
        m.training_step(x, opt)
    return x


def _mean_cost(scorer, imgs):
    return scorer(imgs[:, None])[:, 0].mean().item()


@pytest.mark.parametrize("kind", ["superres", "inpaint", "color"])
def test_guided_scorers_beat_random_samples(kind):
    m = tiny()
    data = _train_briefly(m)
    truth = data[:6]
    if kind == "superres":
        scorer = SuperResolutionScorer(F.adaptive_avg_pool2d(truth, 2))
    elif kind == "inpaint":
        known = torch.zeros(6, 1, 8, 8)
        known[..., :4] = 1
        scorer = InpaintingScorer(truth, known)
    else:
        region = torch.zeros(6, 1, 8, 8)
        region[..., 2:6, 2:6] = 1
        scorer = ColorHintScorer(torch.linspace(0.1, 0.9, 6)[:, None], region)
    guided = m.guided_sample(6, scorer, chunk_size=4)
    rand = m.sample(6 * 8, generator=torch.Generator().manual_seed(0))
    # The scorer's conditions are per sample: score 8 random draws per condition and average.
    rand_cost = torch.stack([scorer(rand[i::6][:6][:, None])[:, 0] for i in range(8)]).mean().item()
    assert _mean_cost(scorer, guided) < 0.7 * rand_cost


def test_guided_sample_candidates_are_chunked():
    m = tiny()
    seen = []

    def scorer(c):
        seen.append(tuple(c.shape))
        return c.flatten(2).mean(2)

    out, z = m.guided_sample(3, scorer, chunk_size=4, return_latent=True)
    assert out.shape == (3, 1, 8, 8) and z.shape == (3, 5)
    assert max(s[1] for s in seen) == 4 and len(seen) == 5 * 2  # K=6 in chunks of 4 and 2, per layer
    assert_close(m.decode(z), out, ratio=1e-6, name="decode(guided latent)")


def test_scorers_are_zero_at_the_truth():
    x = images(3)
    known = (torch.rand(3, 1, 8, 8) > 0.5).float()
    for s in (SuperResolutionScorer(F.adaptive_avg_pool2d(x, 4)), InpaintingScorer(x, known),
              ColorHintScorer(x.mean(dim=(2, 3)))):
        for size in (2, 4, 8):
            cost = s(F.adaptive_avg_pool2d(x, size)[:, None])
            assert cost.shape == (3, 1)
            assert cost.abs().max().item() < 1e-10 or isinstance(s, InpaintingScorer)
    # Inpainting at full resolution only looks at the known pixels.
    s = InpaintingScorer(x, known)
    assert s(x[:, None]).abs().max().item() < 1e-12
    assert s((x + 5 * (1 - known))[:, None]).abs().max().item() < 1e-12


def test_bad_inputs():
    m = tiny()
    with pytest.raises(ValueError, match=r"x must be images \[B, 1, 8, 8\]"):
        m.encode(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="latent must be int64"):
        m.decode(torch.zeros(2, 3, dtype=torch.int64))
