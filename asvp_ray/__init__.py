"""asvp-ray: efficient active learning with pre-trained image models on Ray.

Package layout (where data enters, where features are made, where selection happens):

- ``asvp_ray.data``       pool sources (Fashion-MNIST IDX, image folders, manifests) as Ray Datasets
- ``asvp_ray.features``   timm backbones, distributed extraction, the versioned feature store
- ``asvp_ray.proxy``      the MLP proxy trained on features
- ``asvp_ray.selection``  query strategies behind a registry
- ``asvp_ray.loop``       the driver actor, oracles, the run directory
- ``asvp_ray.train``      fine-tuning with Ray Train
- ``asvp_ray.alignment``  LogME / PED alignment scores and refresh policies
"""
__version__ = "0.1.0"
