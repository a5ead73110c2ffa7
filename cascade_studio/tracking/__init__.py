"""MLflow tracking (SQLite store under the workspace by default). Importing this package does not import mlflow."""

from cascade_studio.tracking.mlflow_tracker import (
    BUFFER_FILE,
    END_STATUSES,
    NullTracker,
    Tracker,
    TrackingError,
    TrackingStoreError,
    TrackingUnavailableError,
    check_reachable,
    default_artifact_location,
    flatten_params,
    list_runs,
    read_run,
    replay_buffer,
    resolve_tracking_uri,
    set_run_deleted,
    start_tracker,
)

__all__ = [
    "BUFFER_FILE",
    "END_STATUSES",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "TrackingStoreError",
    "TrackingUnavailableError",
    "check_reachable",
    "default_artifact_location",
    "flatten_params",
    "list_runs",
    "read_run",
    "replay_buffer",
    "resolve_tracking_uri",
    "set_run_deleted",
    "start_tracker",
]
