"""Benchmarks (`kubellm bench ...`): offline engine, kernels, parallel, roofline and serving. Not shipped in the
router image."""
