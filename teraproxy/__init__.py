"""teraproxy: an OpenAI-compatible gateway in front of vLLM replicas."""

__version__ = "0.1.0"
