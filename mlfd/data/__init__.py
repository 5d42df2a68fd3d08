"""Data: ``datasets`` (the registry and one module per family), ``formats`` (file readers),
``pipelines`` (torch and DALI backends), plus downloads, views, sampling and AutoAugment.

Imports only downward: mlfd.storage, mlfd.errors and third-party packages."""
