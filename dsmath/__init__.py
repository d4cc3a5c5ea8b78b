"""dsmath: DeepSeekMath on Ray. Importing this package is cheap: it loads no Ray, vLLM or DeepSpeed."""

__version__ = "0.1.0"
