"""The experiment plumbing's former module, kept for imports: its names now live in
:mod:`echo_ode_jax.overrides` (config overrides, grids, row names),
:mod:`echo_ode_jax.reports` (JSON / CSV / Markdown reports),
:mod:`echo_ode_jax.tables` (Tables I / II, ablations, resumable stages) and
:mod:`echo_ode_jax.plots` (figures)."""
from echo_ode_jax.overrides import (apply_overrides, base_config, config_digest, config_hash,
                                    grid_keys, parse_grid, parse_value, row_id, row_label)
from echo_ode_jax.plots import pick_key, write_figures
from echo_ode_jax.reports import (ablation_markdown, evaluate_cached, method_names, read_json,
                                  read_summaries, table2_markdown, write_csv, write_json,
                                  write_report)
from echo_ode_jax.tables import (SEGMENTER_NAMES, all_keys_done, echo_ode_label, fit_stage,
                                 mean_fit_seconds, predict_stage, run_ablation, run_table,
                                 segmenter_label, stage)

__all__ = [
    "SEGMENTER_NAMES", "ablation_markdown", "all_keys_done", "apply_overrides", "base_config",
    "config_digest", "config_hash", "echo_ode_label", "evaluate_cached", "fit_stage",
    "grid_keys", "mean_fit_seconds", "method_names", "parse_grid", "parse_value", "pick_key",
    "predict_stage", "read_json", "read_summaries", "row_id", "row_label", "run_ablation",
    "run_table", "segmenter_label", "stage", "table2_markdown", "write_csv", "write_figures",
    "write_json", "write_report",
]
