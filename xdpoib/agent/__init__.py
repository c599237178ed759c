"""The per-attachment agent (see `xdpoib.agent.core` for how its parts fit)."""

from xdpoib.agent.core import Agent, AgentError, main
from xdpoib.agent.links import internal_name

__all__ = ["Agent", "AgentError", "internal_name", "main"]
