"""Model FLOPs of a training step, and model FLOPs utilisation (MFU).

The count follows the usual convention (PaLM appendix B, as torchtitan and litgpt use it):

* linear layers: ``6 x weights x tokens`` (forward 2, backward 4), each token counted through
  the weights it actually passes: its expert's decoder layers for LLM tokens, the ViT encoder and
  the connector for ViT patches, ``vae2llm``/``llm2vae`` for latent tokens, ``lm_head`` for the
  positions that carry cross-entropy;
* attention: ``12 x layers x width x n^2`` per packed sample (``QK^T`` and ``AV``, forward and
  backward, over the full ``n x n`` block - the masked kernels compute it whole), and the same
  per image in the ViT;
* not counted: norms, activations, softmax, RoPE, embeddings (lookups), the frozen autoencoder
  encoding training images outside the network, and the optimiser.

Frozen modules are counted as trained (the convention MFU uses, so figures compare across runs).
``mfu = flops / seconds / peak``; :func:`peak_flops` knows the dense bf16 peaks of common
accelerators, ``UNIMEDVL_PEAK_TFLOPS`` overrides it, and on a CPU there is none (the training
benchmark measures the CPU's own matmul peak instead).
"""

from __future__ import annotations

import os

import torch

from ..config import UniMedVLConfig

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name()
GPU_BF16_PEAKS = (
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card is 756e12 (set UNIMEDVL_PEAK_TFLOPS)
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),
)


def decoder_weights_per_token(config: UniMedVLConfig) -> int:
    """Weights of one decoder layer stack that a token passes (one expert)."""
    llm = config.llm
    attn = llm.hidden_size * (llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim + llm.num_heads * llm.head_dim * llm.hidden_size
    mlp = 3 * llm.hidden_size * llm.intermediate_size
    return llm.num_layers * (attn + mlp)


def vit_weights_per_patch(config: UniMedVLConfig) -> int:
    vit, h = config.vit, config.llm.hidden_size
    layers = vit.num_layers * (4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.intermediate_size)
    patch_embed = 3 * vit.patch_size**2 * vit.hidden_size
    connector = vit.hidden_size * h + h * h
    return layers + patch_embed + connector


def linear_flops(config: UniMedVLConfig, batch, n_ce_tokens: int) -> float:
    """FLOPs (forward + backward) of the linear layers for one packed batch."""
    llm = config.llm
    flops = 6 * decoder_weights_per_token(config) * batch.num_tokens
    flops += 6 * llm.hidden_size * llm.vocab_size * n_ce_tokens
    if batch.vit_patches is not None and batch.vit_patches.numel():
        flops += 6 * vit_weights_per_patch(config) * int(batch.vit_patches.shape[0])
    if batch.latents is not None and batch.latents.numel():
        flops += 6 * 2 * config.patch_latent_dim * llm.hidden_size * int(batch.latents.shape[0])  # vae2llm + llm2vae
    return float(flops)


def attention_flops(config: UniMedVLConfig, batch) -> float:
    """FLOPs (forward + backward) of ``QK^T`` and ``AV`` over each sample's and image's full block."""
    llm = config.llm
    flops = 12 * llm.num_layers * llm.num_heads * llm.head_dim * sum(s * s for s in batch.layout.sample_lengths)
    if batch.vit_patches is not None and batch.vit_patches.numel():
        flops += 12 * config.vit.num_layers * config.vit.hidden_size * sum(s * s for s in batch.vit_seqlens)
    return float(flops)


def step_flops(config: UniMedVLConfig, batch, n_ce_tokens: int) -> float:
    """Model FLOPs (forward + backward) of one packed training batch."""
    return linear_flops(config, batch, n_ce_tokens) + attention_flops(config, batch)


def peak_flops(device: torch.device | str) -> float | None:
    """The accelerator's dense bf16 peak in FLOP/s, or ``None`` where it is not known."""
    override = os.environ.get("UNIMEDVL_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_BF16_PEAKS:
        if key in name:
            return peak
    return None
