"""A toy second model family on the training core: a tiny HF decoder plus a plain-torch "image encoder".

It exercises what the VLM / Omni families will need of ``TrainingModule``: two named losses with their own counts,
two backbones of different libraries (transformers + plain torch) with their own random init, an encoder that is its
own FSDP unit, a dummy forward on ranks whose micro-batch has no image (else FSDP's collectives would not match),
``inputs_embeds`` built on the full sequence and then cut for SP, and a parameter-group override (the encoder
trains at half the learning rate).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from veomni_lightning.models import ModelAdapter, TransformersAdapter, build_model_on_meta, config_from_model_type
from veomni_lightning.models.causal_lm import CausalLMWithLoss
from veomni_lightning.modules import Backbone, TrainingModule
from veomni_lightning.parallel.attention import packed_attention_kwargs
from veomni_lightning.parallel.sequence import shard_packed_batch

VOCAB, HIDDEN, PATCH_DIM, PATCHES, SEQ = 128, 32, 12, 4, 24


class ToyEncoder(nn.Module):
    """Patch features → hidden states (a stand-in for a vision tower)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(PATCH_DIM, 2 * HIDDEN)
        self.fc2 = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(patches)))


class ToyRoot(nn.Module):
    """The FSDP root: builds inputs_embeds (image features first), cuts for SP, returns (lm sum, feature sum)."""

    def __init__(self, lm: CausalLMWithLoss, encoder: ToyEncoder) -> None:
        super().__init__()
        self.lm = lm
        self.encoder = encoder

    def forward(self, micro_batch: dict[str, Any], mesh: Any) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.lm.hf_model.get_input_embeddings()(micro_batch["input_ids"])
        if "image" in micro_batch:
            feats = self.encoder(micro_batch["image"])
            embeds = torch.cat([feats[None], embeds[:, PATCHES:]], dim=1)
            # The encoder runs on the same image on every SP rank: a replicated loss is counted once per group.
            feat_sum = ((feats - 1.0) ** 2).sum() / mesh.sp_size
            zero = 0.0
        else:  # dummy forward: the encoder's FSDP all-gather and reduce-scatter run on this rank too
            dummy = self.encoder(embeds.new_zeros(1, PATCH_DIM))
            feat_sum = dummy.sum() * 0.0
            zero = dummy.sum() * 0.0
        local = shard_packed_batch({**micro_batch, "inputs_embeds": embeds}, mesh.sp_rank, mesh.sp_size)
        kwargs = packed_attention_kwargs(local["cu_seqlens"], local["max_seqlen"], mesh.sp_group)
        lm_sum = self.lm(local["labels"], local["position_ids"], inputs_embeds=local["inputs_embeds"], **kwargs)
        return lm_sum + zero, feat_sum


class ToyImageTextModule(TrainingModule):
    """Two named losses: ``lm`` (token cross-entropy) and ``feat`` (an L2 on encoder features, per patch)."""

    default_loss_weights = {"lm": 1.0, "feat": 0.5}

    def __init__(self, **training: Any) -> None:
        super().__init__(**training)

    def build_model(self) -> tuple[nn.Module, list[Backbone]]:
        shape = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)  # fmt: skip
        hf = build_model_on_meta(config_from_model_type("qwen3", shape), attn_implementation="ulysses")
        with torch.device("meta"):
            encoder = ToyEncoder()
        root = ToyRoot(CausalLMWithLoss(hf, ce_chunk_size=16), encoder)
        return root, [Backbone(hf, TransformersAdapter()), Backbone(encoder, ModelAdapter())]

    def loss_counts(self, micro_batch: dict[str, Any]) -> dict[str, float]:
        return {"lm": micro_batch["num_loss_tokens"], "feat": PATCHES if "image" in micro_batch else 0}

    def loss_sums(self, micro_batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        lm_sum, feat_sum = self.model(micro_batch, self.parallel_mesh)
        return {"lm": lm_sum, "feat": feat_sum}

    def param_groups(self) -> list[dict[str, Any]]:
        encoder = {id(p) for p in self.model.encoder.parameters()}
        rest = [p for p in self.model.parameters() if id(p) not in encoder]
        lr = self.hparams.learning_rate
        return [{"params": rest}, {"params": list(self.model.encoder.parameters()), "lr": 0.5 * lr}]


def toy_micro_batch(index: int) -> dict[str, Any]:
    """Global micro-batch ``index`` of the toy stream: two packed samples; even indices carry an image."""
    g = torch.Generator().manual_seed(1000 + index)
    ids = torch.randint(1, VOCAB, (1, SEQ), generator=g)
    cut = 10
    labels = ids.roll(-1, 1).clone()
    labels[0, cut - 1] = labels[0, -1] = -100  # no target across or past a sample's end
    batch: dict[str, Any] = {
        "position_ids": torch.cat([torch.arange(cut), torch.arange(SEQ - cut)])[None],
        "cu_seqlens": torch.tensor([0, cut, SEQ], dtype=torch.int32),
        "max_seqlen": SEQ - cut,
    }
    if index % 2 == 0:
        ids[0, :PATCHES] = 0  # placeholders
        labels[0, : PATCHES - 1] = -100
        batch["image"] = torch.randn(PATCHES, PATCH_DIM, generator=g)
    batch.update(input_ids=ids, labels=labels, num_loss_tokens=int((labels != -100).sum()))
    return batch


class ToyDataModule(pl.LightningDataModule):
    """``steps`` optimizer steps of ``global_micro_batches`` each, this dp rank's share (as TextDataModule splits)."""

    def __init__(self, steps: int, global_micro_batches: int) -> None:
        super().__init__()
        self.steps, self.global_micro_batches = steps, global_micro_batches

    def train_dataloader(self) -> DataLoader:
        kwargs = self.trainer.strategy.distributed_sampler_kwargs or {}
        dp_size, dp_rank = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        per_rank = self.global_micro_batches // dp_size
        first = [s * self.global_micro_batches + dp_rank * per_rank for s in range(self.steps)]
        stream = [[toy_micro_batch(i + j) for j in range(per_rank)] for i in first]
        # An iterable: Lightning would put a (shuffling) distributed sampler on a map-style dataset.
        return DataLoader(_Steps(stream), batch_size=None)


class _Steps(IterableDataset):
    def __init__(self, steps: list) -> None:
        self.steps = steps

    def __iter__(self):
        return iter(self.steps)
