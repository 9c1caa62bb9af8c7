"""cvdd: a research workbench for dataset distillation by committee voting (CV-DD)."""

__version__ = "0.1.0"
