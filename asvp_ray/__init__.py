"""asvp-ray: efficient active learning with pre-trained image models on Ray.

The Python API: ``asvp_ray.run(config, out)`` and the functions in ``__all__`` (asvp_ray.api).

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

#: The public Python API (asvp_ray.api), imported on first use so that ``import asvp_ray`` stays
#: light. One function per ``asvp-ray`` command: run / resume (a whole experiment), extract, init,
#: select, label, status, final (human rounds), report_runs (asvp_ray.report is the module), study
#: (Ray Tune), strategies; what they return: RunResult, Extracted, Selection; NotARunError; and
#: the config: as_config, Config, load_config.
__all__ = ["run", "resume", "result", "extract", "init", "select", "label", "status", "final", "report_runs", "study",
           "strategies", "as_config", "RunResult", "Extracted", "Selection", "NotARunError", "Config", "load_config",
           "__version__"]

def __getattr__(name):
    if name in __all__ and name != "__version__":
        from asvp_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'asvp_ray' has no attribute {name!r}")
