"""Encoders: open_clip image/text, I3D, ResNet, transformers token features."""
