"""Training data: sources (folders, HF datasets, webdataset tars), image checks and transforms, aspect-ratio
buckets, and the encode-once feature cache. See docs/DESIGN.md ("data/")."""

from .buckets import BucketBatchSampler, assign_bucket, make_buckets
from .cache import (
    CacheError,
    CachedDataset,
    FeatureEncoder,
    build_cache,
    cache_status,
    entry_key,
    read_cache,
    target_size,
    training_crop,
    training_preprocessing,
)
from .images import (
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    BadImageError,
    SkippedFile,
    open_image,
    open_image_file,
    resize_and_crop,
    to_rgb,
    to_tensor01,
)
from .sources import DataSourceError, EmptyDatasetError, Record, ScanResult, scan_source

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MIN_SIDE",
    "BadImageError",
    "BucketBatchSampler",
    "CacheError",
    "CachedDataset",
    "DataSourceError",
    "EmptyDatasetError",
    "FeatureEncoder",
    "Record",
    "ScanResult",
    "SkippedFile",
    "assign_bucket",
    "build_cache",
    "cache_status",
    "entry_key",
    "make_buckets",
    "read_cache",
    "open_image",
    "open_image_file",
    "resize_and_crop",
    "scan_source",
    "target_size",
    "training_crop",
    "training_preprocessing",
    "to_rgb",
    "to_tensor01",
]
