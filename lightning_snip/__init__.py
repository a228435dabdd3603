"""SNIP (single-shot network pruning at initialization) as a PyTorch Lightning callback."""

from lightning_snip.callback import SNIPPruning
from lightning_snip.candidates import find_candidates, sparse_gradient_parameters, weight_norm_directions
from lightning_snip.compress import (
    CompressedStateError,
    compress_state_dict,
    decompress_state_dict,
    load_compressed,
    save_compressed,
)
from lightning_snip.enforcement import ZERO_PRESERVING_OPTIMIZERS, MaskSet, apply_masks_, keeps_zeros
from lightning_snip.export import OnnxExport, export_onnx
from lightning_snip.inference import SparseConv1x1, SparseLinear, densify, sparsify
from lightning_snip.packing import pack_mask, unpack_mask
from lightning_snip.report import sparsity_report
from lightning_snip.scoring import (
    Criterion,
    ScoringContext,
    ScoringError,
    available_criteria,
    get_criterion,
    mean_gradients,
    register_criterion,
)
from lightning_snip.selection import (
    protect_slices_,
    select_masks,
    select_masks_distributed,
    select_n_m_masks,
    shuffle_masks,
)
from lightning_snip.structured import restore_structure

__version__ = "0.2.0"

__all__ = [
    "ZERO_PRESERVING_OPTIMIZERS",
    "CompressedStateError",
    "Criterion",
    "MaskSet",
    "OnnxExport",
    "SNIPPruning",
    "ScoringContext",
    "ScoringError",
    "SparseConv1x1",
    "SparseLinear",
    "apply_masks_",
    "available_criteria",
    "compress_state_dict",
    "decompress_state_dict",
    "densify",
    "export_onnx",
    "find_candidates",
    "get_criterion",
    "keeps_zeros",
    "load_compressed",
    "mean_gradients",
    "pack_mask",
    "protect_slices_",
    "register_criterion",
    "restore_structure",
    "save_compressed",
    "select_masks",
    "select_masks_distributed",
    "select_n_m_masks",
    "shuffle_masks",
    "sparse_gradient_parameters",
    "sparsify",
    "sparsity_report",
    "unpack_mask",
    "weight_norm_directions",
]
