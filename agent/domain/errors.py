"""Errors the core reasons about; adapters translate their own exceptions into these."""

from __future__ import annotations

from agent.domain.redact import quote


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class InvalidRequest(AgentError):
    """The run's request (row fields or configuration) is unusable; the run fails."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        # The value is the row's, so it is quoted short: the message goes back to the web app.
        shown = "" if value is None else f"={quote(value)}"
        super().__init__(f"Invalid training request: {quote(key, 80)[1:-1]}{shown}: {reason}")


class DatasetError(AgentError):
    """The dataset cannot be resolved, fetched or normalized; the run fails."""


class WeightsError(AgentError):
    """The requested base model weights are unavailable; the run fails."""


class ModelNotFound(WeightsError):
    """A model file named by the run is not in WEIGHTS_DIR (it may still be in the models bucket)."""


class TrainingFailed(AgentError):
    """The child trainer exited with an error."""


class BackendUnavailable(AgentError):
    """A transient backend failure (connection lost, timeout, 5xx): worth retrying."""


class BackendError(AgentError):
    """A permanent backend failure (bad request, permission, schema): not worth retrying."""


class NotFound(BackendError):
    """The object asked for does not exist."""


class MissingPrivilege(BackendError):
    """The table is there but the backend's role may not read or write it (SQLSTATE 42501)."""

    def __init__(self, message: str, *, role: str, table: str, privileges: tuple[str, ...]) -> None:
        super().__init__(message)
        self.role = role
        self.table = table
        self.privileges = privileges
