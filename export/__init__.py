"""ONNX export, verification and the ONNX Runtime sampler, installed as ``ddpm_fast.export``.

Nothing here yet: the exporter is its own issue. The package exists so that the install mapping
(repository folder ``export/`` -> ``ddpm_fast.export``) is in place and tested.
"""
