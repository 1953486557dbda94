"""A trained model as an artefact: its network (``networks``), checkpoint file (``checkpoint``), final weights
(``weights``), the preprocessing it expects (``preprocessing``), its description for MLflow and bundles
(``describe``, ``network_def``). Below the engine and the evaluation, which both read and write it."""
