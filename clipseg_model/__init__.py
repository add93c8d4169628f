"""Text-prompted segmentation models (CLIPSeg family): configs, architectures, checkpoints, predictor.

Imports nothing from serving, queues or Label Studio.
"""
