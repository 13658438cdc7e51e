"""esper_assets: storage and orchestration backbone for Esper's ML artifacts."""

__version__ = "0.1.0"
