"""Built-in models shipped as package data.

Each model lives in its own folder (``decision/``: ``model.onnx`` and ``config.yaml``) and is
read with ``importlib.resources.files("agentd.models")``, so it works from a wheel or a zip as
well as from a source checkout. See docs/models.md.
"""
