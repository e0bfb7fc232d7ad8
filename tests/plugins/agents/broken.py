"""A plugin that fails to import: the server must skip it and keep serving."""

raise RuntimeError("this plugin is broken on purpose")
