"""capfilt: BLIP CapFilt (captioning and filtering) for web image-text corpora, on Ray Data."""

__version__ = "0.1.0"
