"""Feature extractors for FID / IS / precision-recall, behind one interface: uint8 images (B, 3, H, W) of any size
in, float32 features (B, D) and, with a classifier head, logits (B, K) out. Extractors are frozen (eval mode even
under a parent's `.train()`) and never download: weights come from a path (or a documented local fallback)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .classifier import DigitsClassifier, load_classifier

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_WEIGHTS_ENV = "SRDD_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_OPTION = "--inception_weights"


def check_uint8_images(img_B3HW: torch.Tensor) -> None:
    """Raise a clear error unless `img_B3HW` is a uint8 (B, 3, H, W) tensor."""
    if not isinstance(img_B3HW, torch.Tensor) or img_B3HW.dtype != torch.uint8:
        got = img_B3HW.dtype if isinstance(img_B3HW, torch.Tensor) else type(img_B3HW).__name__
        raise TypeError(f"feature extractors take uint8 images in [0, 255], got {got}; "
                        "convert [-1, 1] floats with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)")
    if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(img_B3HW.shape)}")


class FeatureExtractor(nn.Module):
    """Frozen network mapping uint8 images (B, 3, H, W) to features (B, feature_dim); a subclass with a classifier
    head implements `features_and_logits`, one without implements `forward`."""

    name: str = ""
    feature_dim: int = 0
    input_resolution: int | None = None
    """Side length the network sees after its own resize (None: any)."""
    num_classes: int | None = None
    """Number of logits, or None when the extractor has no classifier head."""

    @property
    def has_logits(self) -> bool:
        return self.num_classes is not None

    @property
    def cache_key(self) -> str:
        """Identifies extractor *and* weights in cache file names (see reference.py)."""
        return self.name

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def train(self, mode: bool = True) -> FeatureExtractor:
        # A LightningModule calls .train() on all children; BatchNorm/Dropout must stay frozen.
        return super().train(False)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(img_B3HW)[0]

    def features_and_logits(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, D) and logits (B, K) in one pass where the network allows it."""
        return self(img_B3HW), self.logits(img_B3HW)

    def logits(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes); only for extractors with a classifier head."""
        if not self.has_logits:
            raise TypeError(f"feature extractor {self.name!r} has no class logits (no IS / class accuracy); "
                            "check has_logits")
        return self.features_and_logits(img_B3HW)[1]


# --- Inception-v3 (torch-fidelity's TF-compatible port) ---


def resolve_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file, never downloaded: `weights_path`, else $SRDD_INCEPTION_WEIGHTS, else torch.hub's
    cache `$TORCH_HOME/hub/checkpoints/<file>` (where an earlier torch-fidelity download would sit)."""
    how = (f"Set {INCEPTION_WEIGHTS_OPTION} (or the env var {INCEPTION_WEIGHTS_ENV}) to a local copy of "
           f"{INCEPTION_WEIGHTS_FILE} (95,628,359 bytes, torch-fidelity's inception-v3-compat weights, "
           f"published at {INCEPTION_WEIGHTS_URL}); nothing is downloaded at run time.")
    for given, source in ((weights_path, "given explicitly"),
                          (os.environ.get(INCEPTION_WEIGHTS_ENV) or None, f"from ${INCEPTION_WEIGHTS_ENV}")):
        if given is not None:
            if not (path := Path(given).expanduser()).is_file():
                raise FileNotFoundError(f"Inception weights not found at {path} ({source}). {how}")
            return path
    hub_path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if hub_path.is_file():
        return hub_path
    raise FileNotFoundError(f"Inception weights file {INCEPTION_WEIGHTS_FILE} not found (also looked in {hub_path}). "
                            f"{how}")


def _check_inception_state_dict(path: Path) -> None:
    """Load `path` tensors-only (memory-mapped when the format allows) and check it is the Inception state dict."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as e:
        raise ValueError(f"{path} is not a readable Inception weights file ({INCEPTION_WEIGHTS_FILE}): {e}") from e
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048):
        raise ValueError(f"{path} is not torch-fidelity's Inception state dict ({INCEPTION_WEIGHTS_FILE})")


class InceptionV3Extractor(FeatureExtractor):
    """torch-fidelity's `inception-v3-compat`: 2048-d pool features and 1008 'logits_unbiased'; it resizes any input
    to 299x299 with TF1-compatible bilinear interpolation, as the reference TF implementation of FID/IS does."""

    name = "inception-v3-compat"
    feature_dim = 2048
    input_resolution = 299
    num_classes = 1008

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        path = resolve_inception_weights(weights_path)  # before torch-fidelity could reach its download branch
        _check_inception_state_dict(path)  # torch-fidelity unpickles with weights_only=False; vet the file first
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = path
        self.net = FeatureExtractorInceptionV3(self.name, ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path), verbose=False)

    @torch.no_grad()
    def features_and_logits(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_uint8_images(img_B3HW)
        return self.net(img_B3HW.to(self.device))  # (features (B, 2048), logits (B, 1008))


# --- Digits classifier (built-in dataset) ---


class DigitsClassifierExtractor(FeatureExtractor):
    """The framework's digit classifier: penultimate features and 10 logits of uint8 input mapped to [-1, 1] and
    resized (bilinear, antialiased) to the resolution the classifier was trained at, when it differs."""

    name = "digits-classifier"

    def __init__(self, checkpoint_path: str | os.PathLike | None = None, model: DigitsClassifier | None = None,
                 meta: dict | None = None):
        super().__init__()
        if (checkpoint_path is None) == (model is None):
            raise ValueError("DigitsClassifierExtractor needs exactly one of checkpoint_path or model")
        if model is None:
            model, meta = load_classifier(checkpoint_path)
        self.model = model.eval().requires_grad_(False)
        self.meta = dict(meta or {})
        """The checkpoint's meta: `dataset` (the data it was trained on, evaluation.dataset_key), val accuracy..."""
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.feature_dim = model.config.feature_dim
        self.input_resolution = model.config.resolution
        self.num_classes = model.config.num_classes
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        self._fingerprint = h.hexdigest()[:10]

    @property
    def cache_key(self) -> str:
        # A retrained classifier must not reuse reference statistics of the previous one.
        return f"{self.name}-{self._fingerprint}"

    @torch.no_grad()
    def features_and_logits(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_uint8_images(img_B3HW)
        x_B3HW = img_B3HW.to(self.device).float() / 127.5 - 1.0
        r = self.input_resolution
        if x_B3HW.shape[-2:] != (r, r):
            x_B3HW = F.interpolate(x_B3HW, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        features_BD = self.model.features(x_B3HW)
        return features_BD, self.model.head(features_BD)


# --- Registry ---

FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {"inception-v3-compat": InceptionV3Extractor,
                                                                  "digits-classifier": DigitsClassifierExtractor}


def register_feature_extractor(name: str, factory: Callable[..., FeatureExtractor]) -> None:
    """Add an extractor under `name` (e.g. a small stand-in built by a test)."""
    if name in FEATURE_EXTRACTORS and FEATURE_EXTRACTORS[name] is not factory:
        raise ValueError(f"feature extractor {name!r} is already registered")
    FEATURE_EXTRACTORS[name] = factory


def build_feature_extractor(name: str, **kwargs) -> FeatureExtractor:
    """Build a registered extractor: 'inception-v3-compat' takes `weights_path=`, 'digits-classifier'
    `checkpoint_path=` (or `model=`)."""
    if name not in FEATURE_EXTRACTORS:
        raise KeyError(f"unknown feature extractor {name!r}; available: {sorted(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name](**kwargs)
