"""Token generation: language models that stream tokens.

The ONNX token engine (pooled KV cache, continuous batching) is the main backend; GGUF
(llama-cpp-python) and HF (transformers) backends plug in behind the same
:class:`~agentd.generate.types.TextGenerator` protocol. Sampling and the chat template are
shared by all backends so a seeded request gives the same tokens whichever runs it.
"""
