"""Baseline: one Python process per tool call, the usual way to isolate untrusted code
without a sandbox. Reads ``{"file": ..., "name": ..., "arguments": {...}}`` on stdin, runs
the function from that file, prints its JSON result.

``agentd bench tools`` runs it as a plain script in isolated mode (``python -I FILE``: no
environment variables, no user site), so each call pays only for a bare interpreter.
"""

import importlib.util
import json
import sys


def main() -> None:
    request = json.load(sys.stdin)
    spec = importlib.util.spec_from_file_location("tool", request["file"])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {request['file']!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = getattr(module, request["name"])(**request["arguments"])
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
