"""Evaluation metrics on label maps: Dice, frame-to-frame Hausdorff distance,
temporal inconsistency (Painchaud et al. 2022), EF (area and Simpson), and
deformation quality of stored flows; plus the per-sequence / per-file driver
and a paired comparison of two methods on the same cases.

Labels: 0 background, 1 LV cavity (endo), 2 myocardium, 3 LA; 255 marks an
unannotated gt frame. Spacings are (row, col) mm per pixel.
"""
from echo_ode_jax.metrics._deformation import deformation_quality, jacobian_determinant_np
from echo_ode_jax.metrics._dice import (STRUCTURES, annotated_frames, dice, dice_per_frame,
                                        dice_scores, structure_mask)
from echo_ode_jax.metrics._ef import (ef_measures, ejection_fraction, lv_area_mm2,
                                      simpson_volume_ml)
from echo_ode_jax.metrics._evaluate import (evaluate_files, evaluate_sequence, summarize,
                                            table_markdown)
from echo_ode_jax.metrics._hausdorff import (boundary, consecutive_hausdorff,
                                             directed_hausdorff_mm, hausdorff_mm,
                                             temporal_hausdorff)
from echo_ode_jax.metrics._paired import (compare_rows, format_difference, paired_difference,
                                          paired_markdown)
from echo_ode_jax.metrics._shape import (lv_apex, lv_base_points, orientation_deg,
                                         shape_attributes)
from echo_ode_jax.metrics._temporal import (ATTRIBUTE_BOUNDS, ATTRIBUTE_THRESHOLDS,
                                            ATTRIBUTES, CAMUS_NATIVE_SPACING,
                                            attribute_curves, consistency_error,
                                            resample_nearest, sequence_temporal_consistency,
                                            temporal_consistency)

__all__ = [
    "ATTRIBUTES", "ATTRIBUTE_BOUNDS", "ATTRIBUTE_THRESHOLDS", "CAMUS_NATIVE_SPACING",
    "STRUCTURES", "annotated_frames", "attribute_curves", "boundary", "compare_rows",
    "consecutive_hausdorff", "consistency_error", "deformation_quality", "dice",
    "dice_per_frame", "dice_scores", "directed_hausdorff_mm", "ef_measures",
    "ejection_fraction", "evaluate_files", "evaluate_sequence", "format_difference",
    "hausdorff_mm", "jacobian_determinant_np", "lv_apex", "lv_area_mm2", "lv_base_points",
    "orientation_deg", "paired_difference", "paired_markdown", "resample_nearest",
    "sequence_temporal_consistency", "shape_attributes", "simpson_volume_ml",
    "structure_mask", "summarize", "table_markdown", "temporal_consistency",
    "temporal_hausdorff",
]
