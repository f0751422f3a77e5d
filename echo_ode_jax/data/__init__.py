"""Data: the HDF5 layout, CAMUS readers, synthetic sequences."""
from echo_ode_jax.data.hdf5 import (FORMAT_VERSION, LABELS, NUM_CLASSES, UNANNOTATED,
                                    Sequence, iter_sequences, list_keys, read_labels,
                                    read_sequence, set_root_attrs, write_sequence)
