"""Experiments that reproduce the paper's findings on fused_resnet's networks (run them with python -m)."""
