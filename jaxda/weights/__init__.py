"""Pretrained weights from other frameworks (PyTorch state dicts)."""
