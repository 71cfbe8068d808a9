"""Data: record sources, task formats, curriculum mixture and the Grain training pipeline.

    from esrt_jax.data import DataConfig, make_train_iterator, open_source

Names are imported lazily so that `python -m esrt_jax.data.demo` stays light.
"""

import importlib

_EXPORTS = {
    "records": ("Record", "RecordSource", "JsonlSource", "HFSource", "TfdsSource", "ConcatSource",
                "SourceError", "open_source"),
    "tasks": ("TASKS", "Task", "register", "get_task", "TaskTokenizer", "format_task", "split_srt_output", "collate"),
    "mixture": ("MixturePlan", "build_components", "temperature_probs"),
    "augment": ("AugmentConfig",),
    "pipeline": ("DataConfig", "WeightChange", "BadRecordBudgetError", "make_train_dataset",
                 "make_train_iterator", "make_eval_batches"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"esrt_jax.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'esrt_jax.data' has no attribute {name!r}")
