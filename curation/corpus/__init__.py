"""Corpora: the synthetic corpus with known noise (``synth``; ``scenes``, ``noise``, ``spec``, and one
generator per kind: ``pairs``, ``interleaved``, ``video``) and the MMC4 import (``mmc4``)."""
