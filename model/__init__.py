"""BLIP's MED and its trainer: pure PyTorch + transformers (never imports ray or capfilt)."""
