"""Built-in tools. Each public function of each module here is a tool.

These files are compiled into the tool component with the plugin folder's ``tools/*.py``
and run inside the sandbox; the host imports them only in unit tests.
"""
