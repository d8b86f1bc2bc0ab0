"""edgeclr: self-supervised pretraining to edge deployment of small image-embedding models.

This file must stay torch-free: the on-device runtime imports it.
"""

__version__ = "0.1.0"
