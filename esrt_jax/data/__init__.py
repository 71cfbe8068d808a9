"""Data: record sources, task formats, curriculum mixture and the Grain training pipeline.

    from esrt_jax.data import DataConfig, make_train_iterator, open_source
"""

from esrt_jax.data.records import (  # noqa: F401
    Record, RecordSource, JsonlSource, HFSource, TfdsSource, ConcatSource, SourceError, open_source,
)
from esrt_jax.data.tasks import (  # noqa: F401
    TASKS, TASK_IDS, TaskTokenizer, format_task, split_srt_output, collate,
)
from esrt_jax.data.mixture import MixturePlan, build_components, temperature_probs  # noqa: F401
from esrt_jax.data.pipeline import (  # noqa: F401
    DataConfig, WeightChange, BadRecordBudgetError, make_train_dataset, make_train_iterator,
    make_eval_batches,
)
