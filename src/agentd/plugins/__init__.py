"""Plugins: the plugin folder's verification (MANIFEST, ed25519 signatures) and, around it,
the manager that watches the folder and swaps changed plugins in (docs/plugins.md)."""

from __future__ import annotations

from agentd.plugins.manifest import Manifest, PluginRefused, Verifier

__all__ = ["Manifest", "PluginRefused", "Verifier"]
