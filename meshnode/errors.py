"""Errors of the agent (STYLE.md rule 7). Other packages have their own error modules."""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error the agent raises."""


class ConfigError(MeshError):
    """A configuration value is wrong; the agent must not start (or reload) with it.

    ``str()`` is the whole message, for example::

        config error: gossip.probe_interval in /etc/meshnode/agent.toml: expected a
        duration like "1s" or "500ms", got "fast"
    """

    def __init__(self, key: str | None, source: str, message: str) -> None:
        where = f"{key} in {source}" if key else source
        super().__init__(f"config error: {where}: {message}")
        self.key = key
        """The dotted key (``gossip.probe_interval``); the variable's name for an unknown
        ``MESHNODE_*`` variable; None for a whole-file problem (unreadable, bad syntax)."""
        self.source = source
        """Where the value came from: a file path, ``environment variable MESHNODE_X``,
        ``flag --x`` or ``the defaults``."""
        self.message = message
        """What is wrong, without the key and source."""

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str | None, str, str]]:
        # Exceptions pickle their args; ours are the formatted text, not the fields.
        return (type(self), (self.key, self.source, self.message))
