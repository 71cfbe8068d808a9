"""Evaluation: reading results files, per-direction metrics, reports and comparisons.

- `results`: read results JSONL (public ESRT schema, or the original LLM-SRT outputs) into
  records, reporting bad lines with their numbers.
- `metrics`: BLEU / chrF++ / spBLEU per direction, WER / CER per language, averages.
- `compare`: per-direction deltas and win/loss counts between two results files.
- `report`: terminal table, summary.json, directions.csv, table.md, heatmap and bar chart.
"""
