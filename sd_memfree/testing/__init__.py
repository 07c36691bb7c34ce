"""Offline scaffolding for tests, demos and benchmarks: not for production training or scoring.

- ``tiny``: tiny Stable-Diffusion (and SDXL) architecture pipelines with seeded random or briefly
  pretrained weights, and small procedural captioned image sets (``sd-memfree make-tiny-model``,
  ``make-tiny-dataset``), so everything runs without a network.
- ``standin``: stand-ins of the scorer's weights files (SSCD, a tiny open_clip model, FID's
  Inception) with random weights. They load through the same code paths as the real files, so
  the plumbing is tested offline, but the scores they give carry no information: never report
  them as a memorization measure.

Library modules never import this package; the ``sd-memfree make-tiny-*`` commands, the tests,
the demo recipe and the benchmarks do.
"""
