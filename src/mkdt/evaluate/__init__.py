"""Evaluation (the paper's Section 5 protocol): pre-train an encoder on a set, linear-probe it, fine-tune it,
tabulate results."""

from mkdt.evaluate.finetuning import FinetuneConfig, finetune
from mkdt.evaluate.logistic import fit_logistic, sklearn_equivalent_c
from mkdt.evaluate.pretraining import PretrainConfig, pretrain
from mkdt.evaluate.probing import ProbeConfig, combine_probe_results, probe, probe_results
from mkdt.evaluate.tables import bar_chart, csv_text, format_cell, markdown_table, results_table, write_tables

__all__ = [
    "FinetuneConfig",
    "PretrainConfig",
    "ProbeConfig",
    "bar_chart",
    "csv_text",
    "finetune",
    "fit_logistic",
    "format_cell",
    "markdown_table",
    "pretrain",
    "probe",
    "probe_results",
    "combine_probe_results",
    "results_table",
    "sklearn_equivalent_c",
    "write_tables",
]
