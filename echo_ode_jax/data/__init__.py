"""Data: the HDF5 layout, CAMUS readers, synthetic sequences."""
from echo_ode_jax.data.camus import (CamusView, available_views, find_patients, read_cfg,
                                     read_image, read_view)
from echo_ode_jax.data.convert import ConvertReport, convert_camus, to_sequence
from echo_ode_jax.data.hdf5 import (FORMAT_VERSION, LABELS, NUM_CLASSES, UNANNOTATED,
                                    Sequence, iter_sequences, list_keys, read_dataset,
                                    read_labels, read_sequence, set_root_attrs,
                                    write_dataset, write_sequence)
from echo_ode_jax.data.resample import (Resampling, from_source, nearest_index,
                                        resample_image, resize_nearest, to_source)
from echo_ode_jax.data.synthetic import make_dataset, make_sequence
from echo_ode_jax.data.semisynthetic import make_dataset as make_semisynthetic_dataset
from echo_ode_jax.data.semisynthetic import semisynthetic_sequence
