"""Data layer: streaming text/SFT files, tokenizing, greedy packing and a resumable, dp-split Lightning data module.

Micro-batch contract (each train item is a ``list`` of ``grad_accum_steps`` such dicts for this dp rank)::

    input_ids      LongTensor [1, T]   T == micro_batch_tokens exactly; the tail is padding (its own segment)
    labels         LongTensor [1, T]   already shifted: labels[t] = input_ids[t+1] within a sample when t+1 is a
                                       loss token, else -100 (sample ends, padding, SFT prompt tokens)
    position_ids   LongTensor [1, T]   restart at 0 for every sample and for the padding segment
    cu_seqlens     IntTensor  [S + 1]  int32 segment boundaries over all of T (0 ... T), padding segment included
    max_seqlen     int                 longest segment
    num_loss_tokens int                count of labels != -100

Step s consumes global micro-batches [s*G, (s+1)*G), G = dp_size * grad_accum_steps; dp rank r takes
[s*G + r*A, s*G + (r+1)*A), A = grad_accum_steps. No sequence-parallel slicing happens here.
"""

from .datamodule import STAT_KEYS, PackedStepDataset, TextDataModule
from .dit import DiTDataModule
from .packing import IGNORE_INDEX, GreedyPacker, build_micro_batch
from .sources import DataError, RowLocation, expand_files, iter_file_rows, resolve_path, shuffle_buffer
from .tokenize import SampleEncoder, load_tokenizer, pad_token_id
from .vlm import OmniDataModule, VLMDataModule

__all__ = [
    "DataError",
    "DiTDataModule",
    "GreedyPacker",
    "IGNORE_INDEX",
    "PackedStepDataset",
    "RowLocation",
    "STAT_KEYS",
    "SampleEncoder",
    "TextDataModule",
    "OmniDataModule",
    "VLMDataModule",
    "build_micro_batch",
    "expand_files",
    "iter_file_rows",
    "load_tokenizer",
    "pad_token_id",
    "resolve_path",
    "shuffle_buffer",
]
