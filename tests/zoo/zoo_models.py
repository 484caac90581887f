"""The zoo's models: real third-party definitions, built from small configs with seeded random
weights (nothing is downloaded). Each entry says which package it needs, the input shape of one
sample, and what it exercises in decompose."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str           # the pip package that defines it (the test skips without it)
    builder: str           # the function of this module that builds it (what --arch names)
    input_shape: tuple[int, ...]
    exercises: str          # what it checks in decompose
    has_bn: bool = True
    output: str | None = None  # the ModelOutput field ONNX export compares (None: a tensor)
    #: why this model cannot be written as a whole pickled module (then: state_dict + --arch)
    no_pickle: str | None = None

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def build(self) -> nn.Module:
        """The model in eval mode, weights seeded, BatchNorm statistics randomised."""
        torch.manual_seed(0)
        model = globals()[self.builder]().eval()
        _randomize_bn(model)
        return model


def _randomize_bn(model: nn.Module) -> None:
    """BatchNorm statistics and affine terms away from (0, 1), so folding them is a real test."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


# ------------------------------------------------------------------------------- transformers
def resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                       layer_type="bottleneck", num_labels=10)
    return ResNetForImageClassification(cfg)


def convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification
    cfg = ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=10)
    return ConvNextForImageClassification(cfg)


def regnet() -> nn.Module:
    from transformers import RegNetConfig, RegNetForImageClassification
    cfg = RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                       groups_width=8, layer_type="y", num_labels=10)
    return RegNetForImageClassification(cfg)


def mobilenet_v2() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    cfg = MobileNetV2Config(depth_multiplier=0.35, image_size=64, tf_padding=True,
                            num_labels=10)
    return MobileNetV2ForImageClassification(cfg)


def segformer() -> nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    cfg = SegformerConfig(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 1, 2, 2],
                          depths=[1, 1, 1, 1], decoder_hidden_size=32, num_labels=5)
    return SegformerForSemanticSegmentation(cfg)


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(cfg)


def wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, conv_dim=(16, 16, 16), conv_stride=(5, 2, 2),
                         conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4, feat_extract_norm="group",
                         do_stable_layer_norm=False, mask_time_prob=0.0)
    return Wav2Vec2Model(cfg)


def whisper_encoder() -> nn.Module:
    from transformers import WhisperConfig, WhisperModel
    cfg = WhisperConfig(num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=32,
                        vocab_size=100, max_target_positions=16, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return WhisperModel(cfg).get_encoder()


def _encodec() -> nn.Module:
    from transformers import EncodecConfig, EncodecModel
    cfg = EncodecConfig(hidden_size=16, num_filters=4, upsampling_ratios=[4, 2],
                        num_lstm_layers=1, codebook_size=16, target_bandwidths=[1.5])
    return EncodecModel(cfg)


def encodec_encoder() -> nn.Module:
    return _encodec().encoder


def encodec_decoder() -> nn.Module:
    return _encodec().decoder


# ------------------------------------------------------------------------ efficientnet_pytorch
def efficientnet_b0() -> nn.Module:
    from efficientnet_pytorch import EfficientNet
    return EfficientNet.from_name("efficientnet-b0", image_size=64, num_classes=10)


HF = "transformers"
SEGFORMER_NO_PICKLE = (
    "transformers 5 installs output-capturing forward hooks (local functions) on the first "
    "forward of a model that needs its hidden states, and registers what to capture only in "
    "__init__: once run, SegformerForSemanticSegmentation cannot be pickled, and an unpickled "
    "one fails in a fresh process; its state_dict and a builder (--arch) work")
ZOO = [
    ZooModel("hf-resnet", HF, "resnet", (3, 32, 32),
             "bottleneck ResNet, conv + BatchNorm everywhere", output="logits"),
    ZooModel("hf-convnext", HF, "convnext", (3, 32, 32),
             "patchify stem, depthwise 7x7 + LayerNorm", has_bn=False, output="logits"),
    ZooModel("hf-regnet", HF, "regnet", (3, 32, 32),
             "grouped 3x3 convs, squeeze-excitation 1x1 convs", output="logits"),
    ZooModel("hf-mobilenet-v2", HF, "mobilenet_v2", (3, 64, 64),
             "TF 'same' padding computed from the conv's kernel_size and stride",
             output="logits"),
    ZooModel("hf-segformer", HF, "segformer", (3, 64, 64),
             "overlapping patch embeddings, depthwise 3x3 in the MLP, BatchNorm in the head",
             output="logits", no_pickle=SEGFORMER_NO_PICKLE),
    ZooModel("hf-vit", HF, "vit", (3, 32, 32),
             "patch-embedding conv whose parent reads projection.weight.dtype", has_bn=False,
             output="logits"),
    ZooModel("hf-wav2vec2", HF, "wav2vec2", (1600,),
             "1-D feature encoder on a (batch, samples) input, weight_norm positional conv",
             has_bn=False, output="last_hidden_state"),
    ZooModel("hf-whisper-encoder", HF, "whisper_encoder", (8, 64),
             "1-D convs; the encoder reads conv1.stride", has_bn=False,
             output="last_hidden_state"),
    ZooModel("hf-encodec-encoder", HF, "encodec_encoder", (1, 800),
             "weight_norm 1-D convs with reflect padding, dilations, an LSTM", has_bn=False),
    ZooModel("hf-encodec-decoder", HF, "encodec_decoder", (16, 100),
             "weight_norm transposed 1-D convs (upsampling), an LSTM", has_bn=False),
    ZooModel("efficientnet-b0", "efficientnet_pytorch", "efficientnet_b0", (3, 64, 64),
             "Conv2dStaticSamePadding (a conv subclass with its own forward), MBConv, SE"),
]
