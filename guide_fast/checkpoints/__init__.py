"""Checkpoints: reading untrusted weight files and writing the project's own (docs/formats.md).

* pickle_reader  - pickle opcodes -> inert records (nothing is ever called)
* interpret      - records -> checked values (tensors over storages from the file, containers, ...)
* torch_archive  - torch.save zip and legacy containers
* eg3d_pickle    - official EG3D network pickles -> G_ema state dict + typed GeneratorConfig
* files          - the one file-reading layer: torch, .npy, .safetensors, latents
* keys           - the one comparison of a file's tensors with what a network expects
* format         - generators: load/save (guide-fast safetensors), fingerprints, history
* deltas         - bit-exact weight deltas with source and result fingerprints
"""
from .deltas import DELTA_FORMAT, apply_delta, compute_delta, load_delta, revert_delta, save_delta
from .eg3d_pickle import collect_state_dict, config_from_official, read_official_pickle
from .files import LATENT_KEYS, load_latents, read_npy_file, read_safetensors, read_state_dict, read_torch_file, sha256_file
from .format import (
    FORMAT_VERSION, GENERATOR_FORMAT, SYNTHESIS_PREFIX, build_and_fill, checkpoint_history, convert,
    describe_non_finite, load_generator, save_generator, state_fingerprint,
)
from .interpret import EasyDict, ObjectRecord, PersistentObject
from .keys import compare_keys, describe_mismatch

__all__ = [
    "DELTA_FORMAT", "FORMAT_VERSION", "GENERATOR_FORMAT", "LATENT_KEYS", "SYNTHESIS_PREFIX", "EasyDict",
    "ObjectRecord", "PersistentObject", "apply_delta", "build_and_fill", "checkpoint_history", "collect_state_dict",
    "compare_keys", "compute_delta", "config_from_official", "convert", "describe_mismatch", "describe_non_finite",
    "load_delta", "load_generator", "load_latents", "read_npy_file", "read_official_pickle", "read_safetensors",
    "read_state_dict",
    "read_torch_file", "revert_delta", "save_delta", "save_generator", "sha256_file", "state_fingerprint",
]
