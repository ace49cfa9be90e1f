"""Tests of the evaluation building blocks: Fréchet distance, feature extractors, scores, caches."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from srdd_lightning.metrics import (
    INCEPTION_WEIGHTS_FILE,
    DigitsClassifier,
    DigitsClassifierConfig,
    DigitsClassifierExtractor,
    FeatureStats,
    InceptionV3Extractor,
    ReferenceStats,
    build_feature_extractor,
    class_consistency_accuracy,
    frechet_distance,
    load_classifier,
    reference_cache_path,
    reference_stats,
    resolve_inception_weights,
    save_classifier,
    save_reference_stats,
    train_digits_classifier,
)

# ---------------------------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------------------------


def to_uint8(img_B3HW: torch.Tensor) -> torch.Tensor:
    return ((img_B3HW + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def gaussian_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features: x = z A + shift."""
    rng = np.random.default_rng(seed)
    a_DD = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a_DD + shift


def reference_fid(x_ND: np.ndarray, y_MD: np.ndarray) -> float:
    """Independent float64 FID: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix."""
    mu1, mu2 = x_ND.mean(0), y_MD.mean(0)
    s1, s2 = np.cov(x_ND, rowvar=False), np.cov(y_MD, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(s1_half @ s2 @ s1_half), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@pytest.fixture(scope="module")
def digits16():
    """sklearn's digits at 16 px, 3 channels, in [-1, 1]; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    x_N3HW, y_N = x.repeat(1, 3, 1, 1), torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y_N), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1437], perm[1437:]
    return x_N3HW[tr], y_N[tr], x_N3HW[va], y_N[va]


@pytest.fixture(scope="module")
def quick_classifier(digits16):
    """A narrow digits classifier trained briefly (~10 s on one core), the stand-in extractor of these tests."""
    xt, yt, xv, yv = digits16
    t0 = time.time()
    model, acc = train_digits_classifier(xt, yt, xv, yv, epochs=10, seed=0, config=SMALL)
    return model, acc, time.time() - t0


SMALL = DigitsClassifierConfig(width=16)  # 4x fewer FLOPs than the default; enough for tests


def untrained_extractor(seed: int) -> DigitsClassifierExtractor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsClassifierExtractor(model=DigitsClassifier(DigitsClassifierConfig(feature_dim=32)))


# ---------------------------------------------------------------------------------------------
# Fréchet distance and streaming statistics
# ---------------------------------------------------------------------------------------------


def test_frechet_distance_matches_float64_reference():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    x, y = gaussian_features(600, 24, seed=1), gaussian_features(500, 24, seed=2, shift=0.3)
    sx, sy = FeatureStats.from_features(torch.tensor(x, dtype=torch.float64)), FeatureStats.from_features(y)
    np.testing.assert_allclose(sx.mean.numpy(), x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sx.cov.numpy(), np.cov(x, rowvar=False), rtol=0, atol=1e-12)

    fid = sx.frechet_distance(sy)
    assert fid == pytest.approx(reference_fid(x, y), rel=1e-9)
    # The direct SciPy formula (pytorch-fid) and torch-fidelity's eigenvalue formula agree too.
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid == pytest.approx(direct, rel=1e-9)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert fid == pytest.approx(tf["frechet_inception_distance"], rel=1e-8)
    assert fid > 0.5  # the shift alone contributes 24 * 0.09


def test_fid_self_is_zero_and_grows_with_perturbation(digits16, quick_classifier):
    xt, _, _, _ = digits16
    extractor = DigitsClassifierExtractor(model=quick_classifier[0])
    real = FeatureStats(extractor.feature_dim).update(extractor(to_uint8(xt)))
    assert real.frechet_distance(real) == pytest.approx(0.0, abs=1e-6)

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(xt.shape, generator=gen)
    fids = []
    for sigma in (0.05, 0.15, 0.3, 0.6, 1.0):
        noisy = to_uint8((xt + sigma * noise).clamp(-1, 1))
        fids.append(real.frechet_distance(FeatureStats.from_features(extractor(noisy))))
    assert all(b > a for a, b in zip(fids, fids[1:])), fids
    assert fids[0] > 1e-3


@pytest.mark.parametrize("d", [4, 32, 128])
def test_frechet_distance_agrees_with_torch_fidelity_on_random_statistics(d):
    """Ours (streamed across ranks, warns on near-singular input) and torch-fidelity's eigenvalue formula agree."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    for seed in range(4):
        rng = np.random.default_rng(seed)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.1
        s1 = np.cov(rng.normal(size=(3 * d, d)) @ rng.normal(size=(d, d)), rowvar=False)
        s2 = np.cov(rng.normal(size=(2 * d, d)), rowvar=False)
        for a, b in (((mu1, s1), (mu2, s2)), ((mu1, s1), (mu1 + 1e-3, s1 * 1.01))):  # far apart, nearly equal
            ours = frechet_distance(a[0], a[1], b[0], b[1])
            theirs = fid_statistics_to_metric({"mu": a[0], "sigma": a[1]}, {"mu": b[0], "sigma": b[1]}, verbose=False)
            # Relative to the traces: FID is their difference, so its own round-off scales with them.
            scale = np.trace(a[1]) + np.trace(b[1])
            assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=0, abs=1e-13 * scale), (seed, d)


def test_feature_stats_merge_of_halves_equals_whole():
    x = torch.tensor(gaussian_features(301, 12, seed=3, shift=2.0))
    whole = FeatureStats.from_features(x)
    halves = FeatureStats.from_features(x[:120]).merge(FeatureStats.from_features(x[120:]))
    batched = FeatureStats(12)
    for xb in x.split(37):
        batched.update(xb)
    for s in (halves, batched):
        assert s.n == 301
        torch.testing.assert_close(s.mean, whole.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(s.cov, whole.cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(whole.cov, torch.tensor(np.cov(x.numpy(), rowvar=False)), rtol=0, atol=1e-12)
    # float32 features are accumulated in float64, not float32
    x32 = x.float()
    s32 = FeatureStats(12)
    for xb in x32.split(37):
        s32.update(xb)
    assert s32.sum_D.dtype == torch.float64
    torch.testing.assert_close(s32.cov, torch.tensor(np.cov(x32.double().numpy(), rowvar=False)), rtol=0, atol=1e-12)


def test_feature_stats_and_frechet_reject_bad_input():
    s = FeatureStats(4).update(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = s.cov
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        s.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="cannot merge"):
        s.merge(FeatureStats(5))
    with pytest.raises(ValueError, match="NaN"):
        s.update(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="undefined"):
        _ = FeatureStats(4).mean
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # scipy's own "matrix is singular" note
def test_frechet_near_singular_covariances(monkeypatch):
    # 10 samples in 40 dims: rank-deficient covariances, the usual trap with too few samples.
    x, y = gaussian_features(10, 40, seed=4), gaussian_features(10, 40, seed=5)
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_fid(x, y), rel=1e-7)

    # Where sqrtm fails (non-finite, as older SciPy did on singular input), eps * I is added, with a warning.
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def failing_once(a):
        calls.append(1)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    with pytest.warns(RuntimeWarning, match="near-singular.*1e-06 \\* I"):
        fid = frechet_distance(mu1, s1, mu2, s2)
    assert len(calls) == 2 and fid == pytest.approx(reference_fid(x, y), abs=1e-3)

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.5j)  # clearly complex: refuse
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="unusable"):
        frechet_distance(mu1, s1, mu2, s2)


# --- all_reduce across two processes -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fake = torch.tensor(gaussian_features(400, 16, seed=7, shift=0.5))
        real = FeatureStats.from_features(gaussian_features(400, 16, seed=8))
        shard = fake[:150] if rank == 0 else fake[150:]  # unequal shares, as DDP tails give
        stats = FeatureStats(16).update(shard).all_reduce()
        np.save(Path(out_dir) / f"rank{rank}.npy", np.array([stats.n, stats.frechet_distance(real)]))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    fake = gaussian_features(400, 16, seed=7, shift=0.5)
    real = FeatureStats.from_features(gaussian_features(400, 16, seed=8))
    single = FeatureStats.from_features(fake).frechet_distance(real)
    for rank in range(2):
        n, fid = np.load(tmp_path / f"rank{rank}.npy")
        assert n == 400
        assert fid == pytest.approx(single, rel=1e-10)
    # Without an initialised process group all_reduce is a no-op.
    s = FeatureStats.from_features(fake[:150])
    assert s.all_reduce().n == 150


# ---------------------------------------------------------------------------------------------
# feature extractors
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_downloads(monkeypatch, tmp_path):
    """Make every download route raise, and point TORCH_HOME at an empty folder."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def forbidden(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("SRDD_INCEPTION_WEIGHTS", raising=False)
    return tmp_path


def test_missing_inception_weights_raise_without_download(no_downloads, monkeypatch):
    for build in (lambda: InceptionV3Extractor(), lambda: build_feature_extractor("inception-v3-compat")):
        with pytest.raises(FileNotFoundError) as err:
            build()
        msg = str(err.value)
        assert INCEPTION_WEIGHTS_FILE in msg and "--inception_weights" in msg and "SRDD_INCEPTION_WEIGHTS" in msg
        assert str(no_downloads / "torch_home") in msg  # says where it looked

    with pytest.raises(FileNotFoundError, match="given explicitly"):
        InceptionV3Extractor(no_downloads / "nope.pth")
    monkeypatch.setenv("SRDD_INCEPTION_WEIGHTS", str(no_downloads / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*SRDD_INCEPTION_WEIGHTS"):
        InceptionV3Extractor()


def test_inception_weights_resolution_order_and_bad_file(no_downloads, monkeypatch):
    hub_file = no_downloads / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"not a checkpoint")
    assert resolve_inception_weights() == hub_file
    env_file = no_downloads / "env.pth"
    env_file.write_bytes(b"x")
    monkeypatch.setenv("SRDD_INCEPTION_WEIGHTS", str(env_file))
    assert resolve_inception_weights() == env_file
    assert resolve_inception_weights(hub_file) == hub_file
    with pytest.raises(ValueError, match=INCEPTION_WEIGHTS_FILE):  # a wrong file is named, not unpickled
        InceptionV3Extractor(hub_file)
    torch.save({"something": torch.zeros(1)}, env_file)
    with pytest.raises(ValueError, match="not torch-fidelity's Inception state dict"):
        InceptionV3Extractor(env_file)


def test_inception_wrapper_plumbing_with_a_layout_only_file(no_downloads, monkeypatch):
    """The wrapper loads a file through torch-fidelity and returns (B, 2048) / (B, 1008).

    The file holds *random* weights in Inception's layout: it checks the plumbing (loading, dtypes,
    shapes, eval mode), never a metric value.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as m:  # build the architecture once without any weights file
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        m.setattr(torch, "load", lambda *a, **k: {})
        layout = tf_inception.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path="unused")
    path = no_downloads / INCEPTION_WEIGHTS_FILE
    torch.save(layout.state_dict(), path)
    del layout

    ext = build_feature_extractor("inception-v3-compat", weights_path=path)
    assert ext.cache_key == "inception-v3-compat" and ext.feature_dim == 2048 and ext.num_classes == 1008
    ext.train()
    assert not ext.training and not ext.net.training
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f, logits = ext.features_and_logits(img)
    assert f.shape == (2, 2048) and logits.shape == (2, 1008) and f.dtype == torch.float32
    with pytest.raises(TypeError, match="uint8"):
        ext(img.float())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SRDD_INCEPTION_WEIGHTS"), reason="needs $SRDD_INCEPTION_WEIGHTS")
def test_inception_extractor_with_real_weights():
    ext = InceptionV3Extractor()
    img = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f, logits = ext.features_and_logits(img)
    assert f.shape == (4, 2048) and logits.shape == (4, 1008)
    torch.testing.assert_close(ext(img), f)


def test_digits_extractor_interface(tmp_path, digits16, quick_classifier):
    model = quick_classifier[0]
    path = save_classifier(tmp_path / "clf.pt", model, {"val_accuracy": 1.0})
    ext = build_feature_extractor("digits-classifier", checkpoint_path=path)
    assert ext.name == "digits-classifier" and ext.feature_dim == 128 and ext.num_classes == 10
    assert ext.input_resolution == 16 and ext.has_logits

    img16 = to_uint8(digits16[2][:8])
    f, logits = ext.features_and_logits(img16)
    assert f.shape == (8, 128) and logits.shape == (8, 10) and f.dtype == torch.float32
    torch.testing.assert_close(ext(img16), f)
    torch.testing.assert_close(logits, model(digits16[2][:8].mul(127.5).add(127.5).round().div(127.5).sub(1)))
    img32 = F.interpolate(img16.float(), scale_factor=2, mode="nearest").to(torch.uint8)  # resized back inside
    assert ext.logits(img32).argmax(1).eq(logits.argmax(1)).float().mean() >= 0.75

    ext.train()  # a parent LightningModule would do this
    assert not ext.training and not ext.model.training
    with pytest.raises(TypeError, match="uint8"):
        ext(digits16[2][:2])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ext(img16[:, :1])
    with pytest.raises(KeyError, match="available"):
        build_feature_extractor("clip-vit")


def test_classifier_checkpoint_roundtrip_and_errors(tmp_path, quick_classifier):
    model = quick_classifier[0]
    path = save_classifier(tmp_path / "sub" / "clf.pt", model, {"seed": 0})
    loaded, meta = load_classifier(path)
    assert meta == {"seed": 0} and not loaded.training
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert [p.name for p in path.parent.iterdir()] == ["clf.pt"]  # no temp file left behind
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_classifier(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a digits classifier"):
        load_classifier(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pt is not a readable digits classifier checkpoint"):
        load_classifier(tmp_path / "text.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable"):
        load_classifier(truncated)
    ext = DigitsClassifierExtractor(checkpoint_path=path)
    assert ext.meta == {"seed": 0}  # what evaluation checks against the data (dataset, ...)


# ---------------------------------------------------------------------------------------------
# digits classifier training
# ---------------------------------------------------------------------------------------------


def test_classifier_training_reduces_loss_and_is_deterministic(digits16):
    xt, yt, xv, yv = digits16
    xs, ys = xt[:256], yt[:256]
    before = F.cross_entropy(DigitsClassifier(SMALL).eval()(xs), ys).item()
    kw = dict(epochs=8, seed=1, batch_size=32, config=SMALL)
    m1, _ = train_digits_classifier(xs, ys, xv[:100], yv[:100], **kw)
    m2, _ = train_digits_classifier(xs, ys, xv[:100], yv[:100], **kw)
    with torch.no_grad():
        after = F.cross_entropy(m1(xs), ys).item()
    assert after < 0.5 * before, (before, after)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="labels"):
        train_digits_classifier(xs, ys[:10], xv, yv, epochs=1)


def test_small_digits_classifier_reaches_95_percent(quick_classifier):
    _, acc, seconds = quick_classifier
    print(f"small digits classifier: val accuracy {acc:.4f} in {seconds:.1f}s")
    assert acc >= 0.95


@pytest.mark.slow
def test_default_digits_classifier_reaches_95_percent(digits16):
    xt, yt, xv, yv = digits16
    t0 = time.time()
    _, acc = train_digits_classifier(xt, yt, xv, yv, seed=0)  # the defaults the framework uses
    print(f"default digits classifier: val accuracy {acc:.4f} in {time.time() - t0:.1f}s")
    assert acc >= 0.95


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------


# IS, KID and precision/recall (torch-fidelity's) are tested in test_metrics_scores.py.


def test_class_consistency_accuracy(digits16, quick_classifier):
    model, acc, _ = quick_classifier
    _, _, xv, yv = digits16
    ext = DigitsClassifierExtractor(model=model)
    logits = ext.logits(to_uint8(xv))
    assert class_consistency_accuracy(logits, yv) == pytest.approx(acc, abs=0.02)  # uint8 rounding only
    assert class_consistency_accuracy(logits, (yv + 1) % 10) < 0.2
    assert class_consistency_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError, match="requested labels"):
        class_consistency_accuracy(logits, yv[:5])


# ---------------------------------------------------------------------------------------------
# reference statistics cache
# ---------------------------------------------------------------------------------------------


def test_reference_stats_cache_key_and_reuse(tmp_path, digits16):
    xt = digits16[0]
    imgs = to_uint8(xt[:300])
    calls = []

    def images_iter_fn():
        calls.append(1)
        return ((imgs[i : i + 64], torch.zeros(64)) for i in range(0, len(imgs), 64))  # (image, label) batches

    ext_a, ext_b = untrained_extractor(0), untrained_extractor(1)
    ref = reference_stats("digits", 16, ext_a, images_iter_fn, tmp_path, max_stored_features=100)
    assert len(calls) == 1 and ref.count == 300 and ref.features_ND.shape == (100, 32)
    assert ref.path.name == f"digits-{ext_a.cache_key}-16px.npz" and ref.path.is_file()
    direct = FeatureStats.from_features(ext_a(imgs))
    np.testing.assert_allclose(ref.mu_D, direct.mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.sigma_DD, direct.cov.numpy(), rtol=1e-10, atol=1e-12)

    again = reference_stats("digits", 16, ext_a, images_iter_fn, tmp_path, max_stored_features=100)
    assert len(calls) == 1  # loaded, not recomputed
    np.testing.assert_array_equal(again.sigma_DD, ref.sigma_DD)
    np.testing.assert_array_equal(again.features_ND, ref.features_ND)

    # The key separates extractor weights, resolution and subset size.
    names = {
        reference_cache_path(tmp_path, "digits", ext_a.cache_key, 16),
        reference_cache_path(tmp_path, "digits", ext_b.cache_key, 16),
        reference_cache_path(tmp_path, "digits", ext_a.cache_key, 32),
        reference_cache_path(tmp_path, "digits", ext_a.cache_key, 16, num_images=100),
        reference_cache_path(tmp_path, "ffhq", ext_a.cache_key, 16),
    }
    assert len(names) == 5 and ext_a.cache_key != ext_b.cache_key
    sub = reference_stats("digits", 16, ext_b, images_iter_fn, tmp_path, num_images=100)
    assert len(calls) == 2 and sub.count == 100 and sub.path.name.endswith("16px-n100.npz")


def test_reference_stats_reject_mismatches(tmp_path, digits16):
    ext = untrained_extractor(0)
    imgs = to_uint8(digits16[0][:50])
    fn = lambda: [imgs]  # noqa: E731
    with pytest.raises(ValueError, match="keyed to 32x32"):
        reference_stats("digits", 32, ext, fn, tmp_path)
    with pytest.raises(ValueError, match="only 50"):
        reference_stats("digits", 16, ext, fn, tmp_path, num_images=80)
    with pytest.raises(TypeError, match="uint8"):
        reference_stats("digits", 16, ext, lambda: [digits16[0][:50]], tmp_path)

    # A file under the right name whose contents disagree is refused, not silently used.
    path = reference_cache_path(tmp_path, "digits", ext.cache_key, 16)
    bogus = ReferenceStats(np.zeros(32), np.eye(32), 50, "digits", ext.cache_key, 24)
    save_reference_stats(path, bogus)
    with pytest.raises(ValueError, match="resolution=24"):
        reference_stats("digits", 16, ext, fn, tmp_path)
    ref = reference_stats("digits", 16, ext, fn, tmp_path, recompute=True)
    assert ref.resolution == 16 and ref.count == 50
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="delete it"):
        reference_stats("digits", 16, ext, fn, tmp_path)


def test_reference_stats_keep_the_real_features_kid_and_precision_recall_need(tmp_path, digits16):
    ext = untrained_extractor(0)
    imgs = to_uint8(digits16[0])  # 1437 train digits: fewer than the 10k kept, so every one is stored
    ref = reference_stats("digits", 16, ext, lambda: imgs.split(256), tmp_path)
    assert ref.count == 1437 and ref.features_ND.shape == (1437, 32)
    np.testing.assert_array_equal(ref.features_ND, ext(imgs).numpy())  # in order while the reservoir is not full
    sub = reference_stats("digits", 16, ext, lambda: imgs.split(256), tmp_path / "sub", max_stored_features=500)
    assert sub.features_ND.shape == (500, 32)  # a uniform subsample beyond the cap
    assert len({row.tobytes() for row in sub.features_ND}) == 500

    # A cache that lost its features (or kept too few) is refused, not used without KID / precision-recall.
    save_reference_stats(ref.path, ReferenceStats(ref.mu_D, ref.sigma_DD, ref.count, ref.dataset, ref.extractor,
                                                  ref.resolution, features_ND=ref.features_ND[:100]))  # fmt: skip
    with pytest.raises(ValueError, match=r"100 stored real features \(expected 1437\).*delete the file"):
        reference_stats("digits", 16, ext, lambda: imgs.split(256), tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic writes leave no temp file
