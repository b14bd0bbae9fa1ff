"""diffalign.data: training data for the trainers (preference pairs for Diffusion-DPO)."""

from diffalign.data.preference import (
    PreferenceDataset,
    PreferenceRecord,
    StreamingPreferenceDataset,
    collate_preference_batch,
    load_preference_dataset,
    stream_preference_dataset,
    write_preference_dataset,
)


__all__ = [
    "PreferenceDataset",
    "PreferenceRecord",
    "StreamingPreferenceDataset",
    "collate_preference_batch",
    "load_preference_dataset",
    "stream_preference_dataset",
    "write_preference_dataset",
]
