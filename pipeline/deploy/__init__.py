"""A trained model, put to use: ``predict`` on new images or volumes, ``export`` as a MONAI bundle.

Both rebuild the network from a checkpoint (``source``) and preprocess inputs exactly as validation did in
training, from one description of that preprocessing (``preprocessing``): a list of MONAI bundle config items,
parsed by MONAI's ``ConfigParser`` for ``predict`` and written as they are into the bundle's
``configs/inference.json``.
"""
