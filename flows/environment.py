"""Process settings that must be in place before Prefect, MLflow or DVC are imported.

Everything generated lives in the workspace folder, never the user's home: Prefect's ephemeral
server database included. The first ephemeral start migrates a fresh database, which takes ~25 s
on 2 cores, over Prefect's 20 s default.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure(workspace: Path) -> None:
    workspace = workspace.resolve()
    defaults = {
        "PREFECT_HOME": str(workspace / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LOG_PRINTS": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # `mlflow server`/`ui` would start seven job-runner processes (GenAI jobs, trace rollups)
        # that r1flow never uses: on 2 cores they slowed `r1flow ui`'s start and stop (its test timed out).
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # MLflow's client retries a lost server 7 times with doubling waits (minutes); 4 retries
        # (1+2+4+8 s) ride out a restart, and a longer outage fails the run, which a rerun completes.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
