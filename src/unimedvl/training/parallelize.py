"""Activation checkpointing and FSDP2, applied to the model from outside (torchtitan's ``parallelize.py``).

Both are composable ``torch.distributed`` APIs that register forward hooks on the modules they are
given: the model's code and its parameter names (the state-dict keys that checkpoints, the EMA and
the export use) stay exactly the same.  The unit of both is the transformer layer: every decoder
layer (``language_model.model.layers[i]``) and every ViT encoder layer
(``vit_model.vision_model.encoder.layers[i]``).

* :func:`apply_activation_checkpointing` (``torch.distributed._composable.checkpoint``, non-reentrant):
  a layer keeps only its inputs in the forward and recomputes its activations in the backward
  (about one extra forward of the layers; the activation memory of a layer drops to its ``[N, H]``
  input).  Recomputation replays the forward's RNG state, so losses and gradients are unchanged.
* :func:`shard_model` (``fully_shard``): each rank holds a shard of every trained weight.

As in torchtitan, activation checkpointing is applied first and ``fully_shard`` last (it also
wraps the root).  The hooks nest the same way in either order - FSDP's all-gather runs before a
layer's checkpointed region and its reshard after it - and in the backward FSDP gathers a layer's
parameters once for both its recomputation and its gradients.
"""

from __future__ import annotations

import torch
from torch import nn


def transformer_layers(model) -> list[nn.Module]:
    """The units of checkpointing and sharding: every decoder layer, then every ViT encoder layer."""
    return [*model.language_model.model.layers, *model.vit_model.vision_model.encoder.layers]


def apply_activation_checkpointing(model) -> None:
    """Recompute every decoder and ViT layer in the backward instead of keeping its activations.

    Call it once, after any LoRA adapters are in place and before :func:`shard_model`.  The hooks
    recompute only what autograd saved: frozen layers whose inputs need no gradient (the ViT after
    stage 1) save nothing and cost nothing; outside autograd (``no_grad``) a layer runs as before,
    plus an RNG-state read."""
    from torch.distributed._composable import checkpoint

    for layer in transformer_layers(model):
        checkpoint(layer)


def is_activation_checkpointed(module: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` (composable ``checkpoint``) hooks ``module``."""
    from torch.distributed._composable.contract import _get_registry

    return "checkpoint" in (_get_registry(module) or {})


def shard_model(model, bf16: bool = False) -> None:
    """``fully_shard`` every decoder and ViT layer, then the root.  ``bf16``: gather parameters in
    bf16 for compute and reduce gradients in fp32 (the sharded master weights stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in transformer_layers(model):
        fully_shard(layer, mp_policy=policy)
    # the frozen autoencoder encodes training images outside the model's forward: each rank keeps it whole
    ignored = set(model.vae_model.parameters()) if getattr(model.config, "visual_gen", False) else set()
    fully_shard(model, ignored_params=ignored, mp_policy=policy)
