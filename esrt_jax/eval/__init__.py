"""Evaluation: reading results files, per-direction metrics, reports and comparisons.

- `results`: read results JSONL (public ESRT schema, or the original LLM-SRT outputs) into
  records, reporting bad lines with their numbers.
- the metrics themselves (BLEU / chrF++ / spBLEU per direction, WER / CER per language) are
  `esrt_jax.metrics`, one layer down, because training's dev decodes score with them too.
- `compare`: per-direction deltas and win/loss counts between two results files.
- `report`: terminal table, summary.json, directions.csv, table.md, heatmap and bar chart.
"""
