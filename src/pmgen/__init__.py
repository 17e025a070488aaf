"""pmgen: personalized multimodal generation (PMG, WWW 2024) on a laptop CPU."""

__version__ = "0.1.0"
