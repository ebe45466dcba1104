"""Whether the MLflow server (http) or its database (postgresql) answers, in seconds.

Apart from ``components.tracking`` so that ``r1flow run`` can say so before it imports MLflow or
Prefect (a second or more each on a busy machine): MLflow's own client retries for minutes.
"""

from __future__ import annotations

import re


class Unreachable(ConnectionError):
    """The tracking server or database does not answer; the message names the URI."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI (its password hidden), when the tracking URI does not answer."""
    scheme = uri.partition(":")[0]
    try:
        if scheme in ("http", "https"):
            import urllib.request

            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                return
        if scheme.startswith("postgresql"):
            import sqlalchemy

            sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(timeout)}).connect().close()
    except Exception as error:  # noqa: BLE001  (whatever the transport says, the answer is the same)
        reason = getattr(error, "reason", None) or str(error).splitlines()[0]
        raise Unreachable(f"MLflow tracking at {redact(uri)} is unreachable ({reason}); start it, or set "
                          "tracking.tracking_uri to one that answers") from None


def redact(uri: str) -> str:
    """A URI without the password it may carry."""
    return re.sub(r"(//[^/:@]+):[^/@]*@", r"\1:***@", uri)
