"""mmfed: federated, privacy-preserving training of multimodal medical models."""

__version__ = "0.1.0"
