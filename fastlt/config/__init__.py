"""Configuration: one typed :class:`Config` per run, from YAML recipes.

* :mod:`~fastlt.config.loader` — assembles every component's section into :class:`Config`,
  the ``run`` section, ``base:`` composition, ``--set`` overrides, saving the resolved config;
* :mod:`~fastlt.config.typed` — strict dict ↔ dataclass conversion (unknown keys, types,
  closest-key hints) that every section uses;
* :mod:`~fastlt.config.recipes` — the recipes shipped with the package (``--config NAME``,
  ``fastlt recipes``).

Each section is declared beside the code it configures (``fastlt.method.config``,
``fastlt.data.config``, ``fastlt.models.config``, ``fastlt.training.schedule``,
``fastlt.training.engine``, ``fastlt.pipelines.spec``). Nothing here imports torch.
"""
from fastlt._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "Config": "loader", "RunConfig": "loader", "load_config": "loader", "config_from_dict": "loader",
    "config_to_dict": "loader", "save_config": "loader",
    "list_recipes": "recipes", "resolve_config": "recipes",
})
