"""Feature extractors, FID (ours), IS / KID / precision-recall (torch-fidelity) and the digits classifier."""

from .classifier import (DigitsClassifier, DigitsClassifierConfig, classifier_accuracy, load_classifier,
                         save_classifier, train_digits_classifier)
from .features import (FEATURE_EXTRACTORS, INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, DigitsClassifierExtractor,
                       FeatureExtractor, InceptionV3Extractor, build_feature_extractor, register_feature_extractor,
                       resolve_inception_weights)
from .frechet import FeatureStats, frechet_distance
from .reference import (ReferenceStats, compute_reference_stats, load_reference_stats, reference_cache_path,
                        reference_stats, save_reference_stats)
from .scores import (InceptionScore, KernelInceptionDistance, PrecisionRecall, class_consistency_accuracy,
                     inception_score, kernel_inception_distance, precision_recall)

__all__ = [
    "FEATURE_EXTRACTORS", "INCEPTION_WEIGHTS_ENV", "INCEPTION_WEIGHTS_FILE", "DigitsClassifier",
    "DigitsClassifierConfig", "DigitsClassifierExtractor", "FeatureExtractor", "FeatureStats", "InceptionScore",
    "InceptionV3Extractor", "KernelInceptionDistance", "PrecisionRecall", "ReferenceStats", "build_feature_extractor",
    "class_consistency_accuracy", "classifier_accuracy", "compute_reference_stats", "frechet_distance",
    "inception_score", "kernel_inception_distance", "load_classifier", "load_reference_stats", "precision_recall",
    "reference_cache_path", "reference_stats", "register_feature_extractor", "resolve_inception_weights",
    "save_classifier", "save_reference_stats", "train_digits_classifier",
]
